"""parjobs' Prometheus metrics: defined once, here, and served by each daemon at `/metrics`.

Each daemon is a process of its own, so the metrics live in prometheus-client's default registry,
updated where the thing happens (the handler chain, the S3 store, the ledger, the runtime) and
read at scrape time. A leaf of the layers, like `errors`: anything may import it, it imports
nothing of parjobs.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Handler work ranges from a GET (milliseconds) to a run (minutes).
_HANDLER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
_S3_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_LAG_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)

MESSAGES_CONSUMED = Counter(
    "parjobs_messages_consumed",
    "Deliveries through the handler chain, by queue, message type and outcome: ok (acked; a "
    "refusal answered with an ErrorReply included), poison (dead-lettered) or failed (handed "
    "back for redelivery, a cancelled handler included)",
    ["queue", "type", "outcome"],
)
MESSAGES_REDELIVERED = Counter(
    "parjobs_messages_redelivered",
    "Deliveries the broker had delivered before (an earlier handler failed or died)",
    ["queue", "type"],
)
MESSAGES_REFUSED = Counter(
    "parjobs_messages_refused",
    "Requests answered with an ErrorReply, by message type and error code",
    ["type", "code"],
)
MESSAGES_DEAD_LETTERED = Counter(
    "parjobs_messages_dead_lettered",
    "Messages this daemon's consumers put in the dead-letter queue (undecodable, of no type the "
    "queue takes, or refused by the checks or the handler as poison), by queue and reason",
    ["queue", "reason"],
)
MESSAGES_PUBLISHED = Counter(
    "parjobs_messages_published",
    "Messages this daemon published: events, progress reports, and signed replies to requests",
    ["kind", "type"],
)
HANDLER_SECONDS = Histogram(
    "parjobs_handler_seconds",
    "Time a handler took, by queue and message type (whatever its outcome)",
    ["queue", "type"],
    buckets=_HANDLER_BUCKETS,
)
MESSAGE_LAG_SECONDS = Histogram(
    "parjobs_message_lag_seconds",
    "From a message's publication (its AMQP timestamp) to its handler starting: the queue's lag",
    ["queue"],
    buckets=_LAG_BUCKETS,
)
HANDLERS_IN_FLIGHT = Gauge(
    "parjobs_handlers_in_flight",
    "Deliveries being handled now; on compute's run queue, the starts held (running or queued)",
    ["queue"],
)
HANDLER_SLOTS = Gauge(
    "parjobs_handler_slots",
    "Deliveries a queue's consumer takes at once (its prefetch; on compute's run queue, "
    "PARJOBS_MAX_QUEUED_RUNS)",
    ["queue"],
)
RUN_SLOTS = Gauge(
    "parjobs_run_slots", "Calculations this compute daemon runs at once (PARJOBS_MAX_RUNS)"
)
RUN_SLOTS_IN_USE = Gauge("parjobs_run_slots_in_use", "Run slots taken by a running calculation now")
RUNS_QUEUED = Gauge("parjobs_runs_queued", "Accepted starts waiting here for a run slot")
JOB_TRANSITIONS = Counter(
    "parjobs_job_transitions",
    "Job events this daemon appended and published, by event type",
    ["type"],
)
QUEUE_DEPTH = Gauge(
    "parjobs_queue_depth",
    "Messages waiting (ready, not yet delivered) in each queue this daemon consumes, as the "
    "broker counted them at the last scrape",
    ["queue"],
)
DEAD_LETTER_QUEUE_DEPTH = Gauge(
    "parjobs_dead_letter_queue_depth",
    "Messages waiting in the dead-letter queue, as the broker counted them at the last scrape",
)
S3_REQUEST_SECONDS = Histogram(
    "parjobs_s3_request_seconds",
    "S3 requests by operation and outcome: ok, not_found, exists (a lost conditional create) "
    "or error",
    ["operation", "outcome"],
    buckets=_S3_BUCKETS,
)
LEDGER_APPENDS = Counter(
    "parjobs_ledger_appends",
    "Transactions this daemon appended to the ledger",
)
LEDGER_LOST_RACES = Counter(
    "parjobs_ledger_lost_races",
    "Ledger blocks (group commits) that lost the race for their sequence number (retried)",
)
