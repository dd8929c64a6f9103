"""Times in the product's JSON are rounded to the millisecond, whichever writer writes them."""

import json

from sinks import AnswerEvent, JsonLinesSink, json_text, read_answers
from stream.http.app import RoundedJSONResponse
from stream.runtime import StreamStatus

# 0.1 + 0.2 and 97 * (1 / 2) + 1e-14: what float arithmetic leaves in a time
EVENT = AnswerEvent("cam", "q1", "what digit is on screen now ?", "five", (0.1 + 0.2, 48.50000000000001),
                    1733390000.1234567, 160, 0.30000000000000004)


def test_an_answer_written_by_the_jsonl_sink_has_its_times_rounded(tmp_path):
    sink = JsonLinesSink(tmp_path / "answers.jsonl")
    sink.deliver(EVENT)
    sink.close()
    text = (tmp_path / "answers.jsonl").read_text()
    assert "48.50000000000001" not in text and "0.30000000000000004" not in text
    [answer] = read_answers(tmp_path / "answers.jsonl")
    assert answer["time_span"] == [0.3, 48.5]
    assert answer["latency_s"] == 0.3 and answer["wall_time"] == 1733390000.123
    assert answer["answer"] == "five" and answer["cache_tokens"] == 160


def test_only_times_are_rounded():
    status = StreamStatus("cam", temporal_scale=0.0625, stream_time=12.000000000000002, lag_s=0.1 + 0.2)
    data = json.loads(json_text(dict(status.to_dict(), share=1 / 3, at=2.0000000000000004, every=[0.1 + 0.2])))
    assert data["temporal_scale"] == 0.0625 and data["share"] == 1 / 3  # not times: as they are
    assert data["stream_time"] == 12.0 and data["lag_s"] == 0.3 and data["at"] == 2.0 and data["every"] == [0.3]
    assert json.loads(json_text({"answer": "blå", "n": 3, "flag": True})) == {"answer": "blå", "n": 3, "flag": True}
    assert "blå" in json_text({"answer": "blå"})  # UTF-8, not \\u escapes


def test_http_responses_round_times():
    response = RoundedJSONResponse({"answers": [EVENT.to_dict()], "history": [{"time": 2.0000000000000004}]})
    body = json.loads(response.body)
    assert body["answers"][0]["time_span"] == [0.3, 48.5] and body["answers"][0]["latency_s"] == 0.3
    assert body["history"][0]["time"] == 2.0
