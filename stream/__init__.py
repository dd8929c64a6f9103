"""Time, sources and queues: feeds frames to `emloc` and answers to `sinks`."""
