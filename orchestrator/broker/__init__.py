"""The broker seam: RabbitMQ topology, publishing, consuming, request/reply, streams, DLQ."""
