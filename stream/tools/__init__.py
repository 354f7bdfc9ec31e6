"""Tools around the service, not part of it: ``spacenet produce`` and ``spacenet demo``,
``spacenet ingest-bench``, and the local Kafka broker the demo and the tests start."""
