"""Prometheus metrics, per stream: counters and gauges read from each stream's status when scraped,
fold-time and answer-latency histograms observed as folds and answers happen."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

FOLD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ANSWER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.hubs: list = []
        self.folded: dict[str, int] = {}
        self.abandoned: dict[str, int] = {}  # questions withdrawn because their HTTP client went away
        self.fold_seconds = Histogram("emloc_fold_seconds", "Time to fold one chunk into the cache", ["stream"],
                                      buckets=FOLD_BUCKETS, registry=self.registry)
        self.answer_seconds = Histogram("emloc_answer_latency_seconds", "Time to answer one question over the cache",
                                        ["stream"], buckets=ANSWER_BUCKETS, registry=self.registry)
        self.registry.register(_StatusCollector(self))

    def observe_fold(self, stream: str, record) -> None:
        self.folded[stream] = self.folded.get(stream, 0) + record.frames
        self.fold_seconds.labels(stream).observe(record.vision_s + record.prefill_s + record.observe_s
                                                 + record.search_s)

    def observe_answer(self, stream: str, seconds: float) -> None:
        self.answer_seconds.labels(stream).observe(seconds)


class _StatusCollector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        counters = {name: CounterMetricFamily(f"emloc_{name}", text, labels=["stream"]) for name, text in (
            ("frames_sampled", "Frames the sampler kept"),
            ("frames_folded", "Frames folded into the cache"),
            ("frames_dropped", "Frames dropped because folding fell behind the source"),
            ("chunks_folded", "Chunks folded into the cache"),
            ("answers", "Questions answered"),
            ("questions_abandoned", "Questions withdrawn unanswered because their HTTP client went away"))}
        gauges = {name: GaugeMetricFamily(f"emloc_{name}", text, labels=["stream"]) for name, text in (
            ("cache_tokens", "Tokens per layer in the compressed cache"),
            ("temporal_scale", "Spacing of the video's temporal positions (below 1 once compressed past the "
                               "model's temporal range)"),
            ("lag_seconds", "How far the newest folded frame is behind the source"),
            ("questions_waiting", "Questions waiting to be answered"),
            ("up", "1 while the stream's source is connected and folding works"))}
        for hub in self.metrics.hubs:
            status = hub.stream.status()
            label = [hub.id]
            counters["frames_sampled"].add_metric(label, status["frames_seen"])
            counters["frames_folded"].add_metric(label, self.metrics.folded.get(hub.id, 0))
            counters["frames_dropped"].add_metric(label, status["frames_dropped"])
            counters["chunks_folded"].add_metric(label, status["chunks_folded"])
            counters["answers"].add_metric(label, status["answers"])
            counters["questions_abandoned"].add_metric(label, self.metrics.abandoned.get(hub.id, 0))
            gauges["cache_tokens"].add_metric(label, status["cache_tokens"])
            gauges["temporal_scale"].add_metric(label, status["temporal_scale"])
            gauges["lag_seconds"].add_metric(label, status["lag_s"])
            gauges["questions_waiting"].add_metric(label, hub.stream.queue.waiting())
            gauges["up"].add_metric(label, 1.0 if status["state"] in ("starting", "running") else 0.0)
        yield from counters.values()
        yield from gauges.values()
