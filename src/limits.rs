//! Every fixed bound of the server in one table: buffer sizes, queue lengths, counts, intervals. Owns the
//! numbers and the relations between them (checked at compile time at the end of the file); the modules only
//! use them (`crate::limits::X`).
//!
//! Names put the unit last (`..._BYTES`, `..._COUNT`, `..._SECONDS`) and the kind of bound after it
//! (`..._MAX`, `..._MIN`, `..._DEFAULT`); a `Duration` names what it measures (`..._INTERVAL`, `..._AFTER`,
//! `..._FOR`). Operator-tunable values live in [`crate::config`]; the `..._MIN`/`..._MAX` here are the ranges
//! it accepts.

use std::time::Duration;

use crate::queue::record::{RECORD_ALIGN, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};

// ------------------------------------------------------------------ shards (src/shard/, src/server.rs, src/inbound.rs)

/// Shards (cores) at most (`shards` setting; a queue id has 8 bits for the shard).
pub const SHARDS_MAX: usize = 256;
/// Helper threads per shard for blocking work (fdatasync, segment creation, password checks).
pub const SHARD_BLOCKING_THREADS_COUNT: usize = 2;
/// How often a shard looks at the shutdown flag, publishes counters and may run housekeeping.
pub const SHARD_TICK_INTERVAL: Duration = Duration::from_millis(100);
/// Queue housekeeping runs every this many shard ticks.
pub const SHARD_HOUSEKEEPING_INTERVAL_TICKS: u32 = 50;
/// Connections waiting to be accepted per listening socket (listen(2) backlog; the kernel caps it at somaxconn).
pub const LISTEN_BACKLOG_CONNECTIONS_MAX: i32 = 1024;
/// Capacity of each shard-to-shard channel (jobs and outcomes); a full channel makes the sender wait.
pub const MESH_CHANNEL_MESSAGES_MAX: usize = 4096;
/// Smallest locked-memory limit glommio's io_uring rings start with.
pub const MEMLOCK_BYTES_MIN: u64 = 512 * 1024;
/// After the shutdown timeout, how long sessions whose reads were ended get to answer 421 and close.
pub const SHARD_DRAIN_AFTER_SHUT_READS: Duration = Duration::from_secs(2);
/// After a start failure, how long the other executors get to stop before the process exits anyway.
pub const START_ABORT_GRACE: Duration = Duration::from_secs(3);
/// Past `shutdown_timeout`, how long the shards get for their last replies and the queue's last sync.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A burst of unfinished messages this large (peak held minus held now) is given back to the system once over.
pub const SHARD_GIVE_BACK_AFTER_BYTES: u64 = 32 << 20;

// ------------------------------------------------------------------ the event log (src/eventlog.rs)

/// Lines waiting for the event log's writer thread; past this, new lines are dropped (and counted), never
/// waited for.
pub const EVENTLOG_LINES_QUEUED_MAX: usize = 65_536;
/// The writer thread's batch: lines taken from the channel are written with one `write` per this many bytes
/// (or when the channel is empty).
pub const EVENTLOG_WRITE_BUFFER_BYTES: usize = 64 * 1024;
/// How often the event log's writer thread takes the lines queued (a line reaches the file within this).
pub const EVENTLOG_DRAIN_INTERVAL: Duration = Duration::from_millis(20);
/// Longest piece of foreign text (a HELO name, an address, a header value, a remote reply) in a log line.
pub const EVENTLOG_FIELD_BYTES_MAX: usize = 512;
/// Bytes of a message's header section searched for its Message-ID (for the reception record).
pub const EVENTLOG_HEADER_SCAN_BYTES_MAX: usize = 64 * 1024;

// ------------------------------------------------------------------ sessions and their buffers

/// Read buffer of one session; holds at least one maximal command line of the default configuration.
pub const SESSION_READ_BUFFER_BYTES: usize = 64 * 1024;
/// Session read buffers kept for reuse per shard (at most this many times [`SESSION_READ_BUFFER_BYTES`] idle).
pub const SESSION_READ_BUFFERS_FREE_MAX: usize = 256;
/// Largest message buffer capacity a session keeps between transactions; bigger buffers are released.
pub const SESSION_DATA_BUFFER_RETAINED_BYTES_MAX: usize = 256 << 10;
/// How long a session waits for room in the shard's data budget before its message is refused (452 4.3.1).
pub const SESSION_DATA_BUDGET_WAIT_MAX: Duration = Duration::from_secs(2);
/// Smallest free space in a message buffer before a read; the buffer grows in steps of at least this.
pub const SESSION_DATA_GROW_BYTES_MIN: usize = 64 * 1024;
/// Largest single growth step of a message buffer.
pub const SESSION_DATA_GROW_BYTES_MAX: usize = 8 << 20;
/// Free room of a message buffer kept back from the content allowance (a CR at the end of one step is stored
/// as CRLF by the next).
pub const SESSION_DATA_ROOM_SLACK_BYTES: usize = 8;
/// How long a session the reaper ended may take to write its 421 before its connection is shut both ways.
pub const SESSION_EXPIRED_GRACE: Duration = Duration::from_secs(5);
/// Longest AUTH exchange line (base64 of user + password).
pub const SESSION_AUTH_LINE_BYTES_MAX: usize = 12 * 1024;
/// Longest client-supplied name (EHLO, AUTH user) written into a Received header.
pub const RECEIVED_HELO_BYTES_MAX: usize = 255;

// ------------------------------------------------------------------ SMTP syntax (src/smtp/)

/// Longest local part accepted (RFC 5321 §4.5.3.1.1).
pub const SMTP_LOCAL_PART_BYTES_MAX: usize = 64;
/// Longest domain accepted (RFC 5321 §4.5.3.1.2).
pub const SMTP_DOMAIN_BYTES_MAX: usize = 255;
/// Longest path (`<local@domain>` contents) accepted (RFC 5321 §4.5.3.1.3).
pub const SMTP_PATH_BYTES_MAX: usize = 256;
/// Smallest `line_length_limit` (command line, RFC 5321 §4.5.3.1.4: 512 with the CRLF).
pub const SMTP_COMMAND_LINE_BYTES_MIN: usize = 512;
/// Largest `line_length_limit`.
pub const SMTP_COMMAND_LINE_BYTES_MAX: usize = 1 << 20;
/// Default `line_length_limit`.
pub const SMTP_COMMAND_LINE_BYTES_DEFAULT: usize = 2048;
/// Longest stored/sent message line, `smtp_line_length_limit` (RFC 5321 §4.5.3.1.6: 1000 with the CRLF).
pub const SMTP_TEXT_LINE_BYTES_MAX: usize = 998;
/// Shortest non-zero `smtp_line_length_limit`.
pub const SMTP_TEXT_LINE_BYTES_MIN: usize = 78;
/// Longest reply the SMTP client reads (src/smtp/client.rs).
pub const SMTP_CLIENT_REPLY_BYTES_MAX: usize = 64 * 1024;
/// Most lines of one multi-line reply the SMTP client reads.
pub const SMTP_CLIENT_REPLY_LINES_MAX: usize = 512;
/// Read buffer of one outbound connection (src/delivery/outbound.rs).
pub const SMTP_CLIENT_READ_BUFFER_BYTES: usize = 16 * 1024;
/// Largest message `sendmail` reads from its standard input.
pub const SENDMAIL_INPUT_BYTES_MAX: usize = 64 << 20;
/// `sendmail`: the TCP connection to the relay's listener.
pub const SENDMAIL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// `sendmail`: waits for the replies to RSET and QUIT (the message is queued or refused by then).
pub const SENDMAIL_QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// `sendmail -bs`: bytes held between a read and its write, one buffer in each direction.
pub const SENDMAIL_PROXY_BUFFER_BYTES: usize = 64 * 1024;
/// `sendmail -bs`: after standard input ends, how long the relay may stay silent before sendmail stops waiting
/// for it to close the session.
pub const SENDMAIL_PROXY_DRAIN_AFTER: Duration = Duration::from_secs(30);
/// `sendmail -bs`: how often the relay-to-stdout side looks at that deadline while it waits.
pub const SENDMAIL_PROXY_POLL_INTERVAL: Duration = Duration::from_secs(1);

// ------------------------------------------------------------------ queue (src/queue/)

/// Default `message_size_limit` (Postfix's).
pub const MESSAGE_SIZE_BYTES_DEFAULT: u64 = 10_240_000;
/// Largest `message_size_limit`.
pub const MESSAGE_SIZE_BYTES_MAX: u64 = 1 << 30;
/// Room a segment keeps past `message_size_limit` for the envelope and the Received header of a message record.
pub const QUEUE_SEGMENT_HEADROOM_BYTES: u64 = 1 << 20;
/// Default size of one segment file.
pub const QUEUE_SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;
/// Smallest `queue_segment_size`.
pub const QUEUE_SEGMENT_BYTES_MIN: u64 = 1 << 20;
/// Largest `queue_segment_size` (record offsets are checked against `u32`).
pub const QUEUE_SEGMENT_BYTES_MAX: u64 = u32::MAX as u64;
/// Longest diagnostic kept in a progress record (longer ones are truncated).
pub const QUEUE_DIAGNOSTIC_BYTES_MAX: usize = 512;
/// Largest staging buffer a segment keeps for reuse after a sync.
pub const QUEUE_STAGING_SPARE_BYTES_MAX: usize = 16 << 20;
/// Message bytes one housekeeping run copies forward at most (compaction), by default.
pub const QUEUE_COMPACTION_COPY_BYTES_PER_RUN_DEFAULT: u64 = 16 << 20;
/// Failed sync ranges remembered; past this the queue refuses every ticket until restart.
pub const QUEUE_FAILED_RANGES_MAX: usize = 1024;
/// `queue_commit_delay_us` default: off, every sync starts at once (README, "Group commit pacing": 1000 µs cut
/// the syncs 2.1-3.5x; its CPU and throughput effect was mostly positive but within this machine's noise).
pub const QUEUE_COMMIT_DELAY_US_DEFAULT: u64 = 0;
/// `queue_commit_delay_us` at most: 10 ms added to a 250.
pub const QUEUE_COMMIT_DELAY_US_MAX: u64 = 10_000;
/// Records nobody waits for are synced at the latest this long after their append.
pub const QUEUE_IDLE_FLUSH_AFTER: Duration = Duration::from_millis(100);

// ------------------------------------------------------------------ delivery (src/delivery/)

/// Messages with jobs out at once per shard.
pub const DELIVERY_MESSAGES_IN_FLIGHT_MAX: usize = 20_000;
/// Most transactions pipelined on one outbound connection (`delivery.smtp_transaction_pipelining_limit`).
/// Bounds the client session's transaction queue: the commands of at most this many messages.
pub const SMTP_TRANSACTIONS_IN_FLIGHT_MAX: usize = 32;
/// Most content bytes of the messages pipelined behind the first one on a connection: a message joins a batch
/// only while the batch's contents (each held in its wire form until it goes) stay within this.
pub const SMTP_PIPELINED_BYTES_MAX: u64 = 1 << 20;
/// How often the dispatcher looks at the schedule.
pub const DELIVERY_TICK_INTERVAL: Duration = Duration::from_millis(200);
/// Failures in a row (connection level, or 4xx to MAIL/DATA) before a destination backs off.
pub const DESTINATION_FAILURES_CONSECUTIVE_MAX: u32 = 3;
/// Jobs queued for one destination (beyond its open connections); more are handed back postponed and wait in
/// the accepting shard's queue.
pub const DESTINATION_JOBS_QUEUED_MAX: usize = 4096;
/// A recipient handed back postponed (its destination's queue full) is offered again after this many ms.
pub const POSTPONED_RETRY_AFTER_MS: u64 = 1000;
/// Destinations (next hops) a shard keeps state for at once; the least recently used idle one goes first.
pub const DESTINATIONS_MAX: usize = 10_000;
/// How long a recipient domain's site (its MX host set) is remembered by the domain's owner; a failed lookup
/// (the domain then keeps a destination of its own) is remembered `SITE_LOOKUP_FAILED_REMEMBER_FOR`.
pub const SITE_REMEMBER_FOR: Duration = Duration::from_secs(300);
pub const SITE_LOOKUP_FAILED_REMEMBER_FOR: Duration = Duration::from_secs(30);
/// Domains a shard remembers the site of (past this, expired entries go, then all).
pub const SITES_REMEMBERED_MAX: usize = 10_000;
/// Site lookups under way at once per shard (past this, a domain's jobs go to a destination of its own).
pub const SITE_LOOKUPS_MAX: usize = 1_000;
/// A destination with no connection and no job for this long is forgotten.
pub const DESTINATIONS_IDLE_EVICT_AFTER: Duration = Duration::from_secs(300);
/// After opportunistic TLS failed with a host, plaintext is used for it this long.
pub const TLS_BROKEN_REMEMBER_FOR: Duration = Duration::from_secs(600);
/// Hosts remembered as TLS-broken per shard; the oldest entry goes first.
pub const TLS_BROKEN_HOSTS_MAX: usize = 10_000;
/// The delivery log is flushed at least this often.
pub const DELIVERY_LOG_FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// The delivery log is flushed once this much is buffered.
pub const DELIVERY_LOG_FLUSH_AFTER_BYTES: usize = 256 * 1024;
/// Delivery log lines buffered at most (past this, lines are dropped and counted).
pub const DELIVERY_LOG_BUFFER_BYTES_MAX: usize = 16 << 20;
/// Original header bytes quoted in a bounce (DSN).
pub const DSN_ORIGINAL_HEADER_BYTES_MAX: usize = 64 * 1024;

// ------------------------------------------------------------------ local delivery (src/local/)

/// Recipients in one local batch.
pub const LOCAL_BATCH_RECIPIENTS_MAX: usize = 512;
/// Local batches being written and synced at once.
pub const LOCAL_BATCHES_IN_FLIGHT_MAX: usize = 4;
/// fdatasyncs of the local shard in flight at once.
pub const LOCAL_WRITES_IN_FLIGHT_MAX: usize = 256;
/// Sync helper threads of the local shard (the file system folds concurrent syncs into one journal commit).
pub const LOCAL_SYNC_THREADS_COUNT: usize = 64;
/// Helper threads that create and write a local batch's files.
pub const LOCAL_WRITER_THREADS_COUNT: usize = 2;
/// Jobs waiting for the local shard (its channel's capacity).
pub const LOCAL_JOBS_QUEUED_MAX: usize = 4096;
/// How often an idle local shard looks at the shutdown flag.
pub const LOCAL_TICK_INTERVAL: Duration = Duration::from_millis(100);
/// Longest local mailbox name (a path component).
pub const LOCAL_MAILBOX_NAME_BYTES_MAX: usize = 64;
/// Largest lookup file (aliases, passwd-style maps) read; a bigger one is an error.
pub const LOCAL_MAP_FILE_BYTES_MAX: u64 = 64 << 20;
/// Symlinks followed in one path walk (the kernel's limit).
pub const LOCAL_SYMLINKS_FOLLOWED_MAX: usize = 40;

// ------------------------------------------------------------------ DNS (src/dns/)

/// CNAME links followed inside one answer (CNAMEs are not chased with further queries).
pub const DNS_CNAME_HOPS_MAX: usize = 8;
/// Records of the asked type kept from one answer; the rest are ignored.
pub const DNS_ANSWER_RECORDS_MAX: usize = 64;
/// Positive answers are cached at most this long.
pub const DNS_POSITIVE_TTL_SECONDS_MAX: u32 = 86_400;
/// Negative answers (NXDOMAIN, NODATA) are cached at most this long.
pub const DNS_NEGATIVE_TTL_SECONDS_MAX: u32 = 3_600;
/// Negative TTL when the answer carries no SOA record.
pub const DNS_NEGATIVE_TTL_SECONDS_DEFAULT: u32 = 60;
/// EDNS UDP payload size advertised (the DNS flag day 2020 value).
pub const DNS_EDNS_PAYLOAD_BYTES: u16 = 1232;
/// UDP receive buffer: larger than the advertised EDNS payload, for servers that ignore it.
pub const DNS_UDP_BUFFER_BYTES: usize = 4096;
/// Rounds over the server list at most (`dns.attempts` is clamped to this).
pub const DNS_ATTEMPTS_MAX: u32 = 5;
/// Datagrams that are not the awaited answer read before a try gives up.
pub const DNS_STRAY_DATAGRAMS_MAX: usize = 16;
/// `nameserver` lines read from resolv.conf (glibc uses 3).
pub const DNS_RESOLV_CONF_SERVERS_MAX: usize = 8;

// ------------------------------------------------------------------ privileges (src/privileges.rs)

/// Buffer for one account entry looked up with getpwnam_r (a longer entry: "no such user").
pub const PASSWD_ENTRY_BYTES_MAX: usize = 16 * 1024;

// ------------------------------------------------------------------ anvil (src/anvil.rs)

/// Client addresses remembered at once.
pub const ANVIL_ENTRIES_MAX: usize = 100_000;
/// Longest delay before a failed AUTH is answered.
pub const ANVIL_DELAY_MAX: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------ configuration, reload, service (src/config.rs, src/reloadable.rs, src/server.rs, src/sd_notify.rs)

/// Largest part of /etc/hosts read for the default `myhostname` (the rest is ignored).
pub const HOSTS_FILE_BYTES_MAX: u64 = 1 << 20;
/// Tries of the start's check that no other process holds a listener's address (EADDRINUSE only): a process
/// killed a moment ago releases its sockets shortly after it is reaped.
pub const LISTENER_PROBE_TRIES_MAX: u32 = 5;
/// Pause between two such tries.
pub const LISTENER_PROBE_RETRY_AFTER: Duration = Duration::from_millis(100);
/// Longest message sent to systemd's notification socket (a STATUS= line is cut to fit).
pub const SD_NOTIFY_MESSAGE_BYTES_MAX: usize = 4096;
/// Restart-only settings named in one reload's warning lines at most (the rest are counted).
pub const RELOAD_RESTART_KEYS_LISTED_MAX: usize = 64;

// Control plane (the HTTP API and `shardmta queue` on a running server).
/// Control requests waiting in one shard's channel; a sender waits for room beyond it.
pub const CONTROL_REQUESTS_QUEUED_MAX: usize = 64;
/// How long a control request waits for a shard to take it and answer (a queue change includes its sync).
pub const CONTROL_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// A shard's answer to a health question (`/health`): every shard is asked at once, so this is the answer's
/// bound; a shard slower than this is reported as not answering.
pub const HEALTH_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of a control answer the command line reads (a queue listing of a big queue is the largest).
pub const CONTROL_ANSWER_BYTES_MAX: usize = 256 << 20;
/// Queue IDs in one control request.
pub const CONTROL_IDS_MAX: usize = 10_000;

// ------------------------------------------------------------------ HTTP API and metrics (src/http/)

/// Helper threads of the HTTP executor (the spool scan of `GET /api/v1/queue`).
pub const HTTP_BLOCKING_THREADS_COUNT: usize = 2;
/// Concurrent connections on the `[http] listen` TCP listener; one more is answered 503 and closed.
pub const HTTP_TCP_CONNECTIONS_MAX: usize = 64;
/// Concurrent connections on the control socket, counted apart so TCP clients cannot lock the CLI out.
pub const HTTP_UNIX_CONNECTIONS_MAX: usize = 16;
/// Time a client has to send a request's head (from the connection, or from the previous response).
pub const HTTP_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A TCP read or write that waits longer than this ends the connection (an idle keep-alive included).
pub const HTTP_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest life of one HTTP connection, keep-alive included: a slow client cannot hold a slot for ever.
pub const HTTP_CONNECTION_LIFETIME_MAX: Duration = Duration::from_secs(300);
/// How often the HTTP executor's timer wakes expired sleeps (the resolution of hyper's header timeout).
pub const HTTP_TIMER_TICK_INTERVAL: Duration = Duration::from_millis(100);
/// Largest request head (request line and headers).
pub const HTTP_HEADER_BYTES_MAX: usize = 16 * 1024;
/// Largest request body, except an injection's.
pub const HTTP_BODY_BYTES_MAX: usize = 1 << 20;
/// An injection's body may be `message_size_limit * 4 / 3` (base64) plus this much (JSON fields, escapes).
pub const HTTP_INJECT_BODY_SLACK_BYTES: u64 = 64 * 1024;
/// Messages of one injection (the built form makes one per recipient) waiting for their shard at once.
pub const HTTP_INJECT_MESSAGES_IN_FLIGHT_MAX: usize = 32;
/// The messages one built injection makes (a copy per recipient), together, while they wait for their shards:
/// a request needing more is refused (413) before or while they are built (at least `message_size_limit`).
pub const HTTP_INJECT_BUILT_BYTES_MAX: u64 = 64 << 20;
/// Attachments in one built injection.
pub const HTTP_INJECT_ATTACHMENTS_MAX: usize = 100;
/// Extra headers in one built injection.
pub const HTTP_INJECT_HEADERS_MAX: usize = 100;
/// Substitutions (global plus one recipient's) in one built message.
pub const HTTP_INJECT_SUBSTITUTIONS_MAX: usize = 1000;
/// Largest `api_token_file`.
pub const HTTP_TOKEN_FILE_BYTES_MAX: u64 = 1 << 20;
/// Shortest bearer token accepted in `api_token_file`.
pub const HTTP_TOKEN_BYTES_MIN: usize = 16;
/// Longest bearer token (and token name) in `api_token_file`.
pub const HTTP_TOKEN_BYTES_MAX: usize = 4096;
/// Destinations whose delivered/deferred counts a shard keeps for /metrics (the least busy goes first).
pub const METRICS_DESTINATIONS_PER_SHARD_MAX: usize = 64;
/// Destinations /metrics shows at most: the busiest over all shards.
pub const METRICS_DESTINATIONS_EXPORTED_MAX: usize = 64;
/// Queued messages up to which a shard counts its queue by state every tick; with more, once per
/// housekeeping interval (the count walks the pending index).
pub const METRICS_QUEUE_STATES_EVERY_TICK_MESSAGES_MAX: usize = 10_000;

// ------------------------------------------------------------------ relations

// A session read buffer holds a maximal command line of the default configuration twice over (one partial line
// kept plus a full read), and a maximal AUTH line.
const _: () = assert!(SESSION_READ_BUFFER_BYTES >= 2 * SMTP_COMMAND_LINE_BYTES_DEFAULT);
const _: () = assert!(SESSION_READ_BUFFER_BYTES >= SESSION_AUTH_LINE_BYTES_MAX);
const _: () = assert!(SMTP_COMMAND_LINE_BYTES_MIN <= SMTP_COMMAND_LINE_BYTES_DEFAULT);
const _: () = assert!(SMTP_COMMAND_LINE_BYTES_DEFAULT <= SMTP_COMMAND_LINE_BYTES_MAX);
// An AUTH line may be longer than a command line, never shorter.
const _: () = assert!(SESSION_AUTH_LINE_BYTES_MAX >= SMTP_COMMAND_LINE_BYTES_MIN);
const _: () = assert!(SMTP_TEXT_LINE_BYTES_MIN <= SMTP_TEXT_LINE_BYTES_MAX);
// A path holds a local part, '@' and a domain only within RFC 5321's path limit: the parts are bounded each.
const _: () = assert!(SMTP_LOCAL_PART_BYTES_MAX < SMTP_PATH_BYTES_MAX);
const _: () = assert!(SMTP_DOMAIN_BYTES_MAX < SMTP_PATH_BYTES_MAX);
const _: () = assert!(RECEIVED_HELO_BYTES_MAX <= SMTP_DOMAIN_BYTES_MAX);
const _: () = assert!(SESSION_DATA_GROW_BYTES_MIN <= SESSION_DATA_GROW_BYTES_MAX);
const _: () = assert!(SESSION_DATA_ROOM_SLACK_BYTES < SESSION_DATA_GROW_BYTES_MIN);
const _: () = assert!(SESSION_DATA_GROW_BYTES_MIN <= SESSION_DATA_BUFFER_RETAINED_BYTES_MAX);
// A burst given back is larger than one retained buffer (else every transaction would trim the heap).
const _: () = assert!(SHARD_GIVE_BACK_AFTER_BYTES > SESSION_DATA_BUFFER_RETAINED_BYTES_MAX as u64);

// Segments: the header and one smallest record fit in the smallest segment; sizes are record-aligned; a segment
// offset fits the record framing's u32; the default segment holds a message of the default size limit.
const _: () = assert!(QUEUE_SEGMENT_BYTES_MIN >= (SEGMENT_HEADER_LEN + RECORD_HEADER_LEN) as u64);
const _: () = assert!(QUEUE_SEGMENT_BYTES_MIN.is_multiple_of(RECORD_ALIGN as u64));
const _: () = assert!(QUEUE_SEGMENT_BYTES_DEFAULT.is_multiple_of(RECORD_ALIGN as u64));
const _: () = assert!(QUEUE_SEGMENT_BYTES_MIN <= QUEUE_SEGMENT_BYTES_DEFAULT);
const _: () = assert!(QUEUE_SEGMENT_BYTES_DEFAULT <= QUEUE_SEGMENT_BYTES_MAX);
const _: () = assert!(QUEUE_SEGMENT_BYTES_MAX <= u32::MAX as u64);
const _: () =
    assert!(MESSAGE_SIZE_BYTES_MAX + QUEUE_SEGMENT_HEADROOM_BYTES <= QUEUE_SEGMENT_BYTES_MAX);
const _: () = assert!(
    MESSAGE_SIZE_BYTES_DEFAULT + QUEUE_SEGMENT_HEADROOM_BYTES <= QUEUE_SEGMENT_BYTES_DEFAULT
);
const _: () = assert!(MESSAGE_SIZE_BYTES_DEFAULT <= MESSAGE_SIZE_BYTES_MAX);
// A progress record with a maximal diagnostic fits in the headroom, and so does a maximal AUTH user and HELO.
const _: () = assert!(
    (RECORD_HEADER_LEN + QUEUE_DIAGNOSTIC_BYTES_MAX + 64) as u64 <= QUEUE_SEGMENT_HEADROOM_BYTES
);
// Reusing a staging buffer never keeps more than a segment's worth.
const _: () = assert!(QUEUE_STAGING_SPARE_BYTES_MAX as u64 <= QUEUE_SEGMENT_BYTES_DEFAULT);
// Compaction copies less than a segment per run (the copies go to the active segment).
const _: () = assert!(QUEUE_COMPACTION_COPY_BYTES_PER_RUN_DEFAULT < QUEUE_SEGMENT_BYTES_DEFAULT);
// The commit pacing's load window (8 delays at most) ends before the idle flush is due: an idle flush is never
// held back by it.
const _: () = assert!(QUEUE_COMMIT_DELAY_US_MAX * 8 < QUEUE_IDLE_FLUSH_AFTER.as_micros() as u64);
// Idle records are flushed before the shard's next housekeeping could want them durable.
const _: () = assert!(
    QUEUE_IDLE_FLUSH_AFTER.as_millis()
        <= SHARD_TICK_INTERVAL.as_millis() * SHARD_HOUSEKEEPING_INTERVAL_TICKS as u128
);

// Delivery: a destination's queue is a part of the shard's in-flight messages; an idle destination is kept
// for more than one dispatcher tick (else it would be evicted between two looks at the schedule).
const _: () = assert!(DESTINATION_JOBS_QUEUED_MAX <= DELIVERY_MESSAGES_IN_FLIGHT_MAX);
const _: () =
    assert!(DESTINATIONS_IDLE_EVICT_AFTER.as_millis() > DELIVERY_TICK_INTERVAL.as_millis());
const _: () = assert!(DESTINATION_FAILURES_CONSECUTIVE_MAX >= 1);
const _: () = assert!(DELIVERY_LOG_FLUSH_AFTER_BYTES <= DELIVERY_LOG_BUFFER_BYTES_MAX);
// sendmail input becomes one message: never more than the largest message the queue takes.
const _: () = assert!(SENDMAIL_INPUT_BYTES_MAX as u64 <= MESSAGE_SIZE_BYTES_MAX);
// A reply line fits in the client's reply limit, and one read buffer holds a whole ordinary reply line.
const _: () = assert!(SMTP_CLIENT_READ_BUFFER_BYTES >= SMTP_COMMAND_LINE_BYTES_MIN);
const _: () = assert!(SMTP_CLIENT_REPLY_BYTES_MAX >= SMTP_CLIENT_READ_BUFFER_BYTES);

// Local delivery: a batch is a part of the job queue; writes in flight cover the batches in flight.
const _: () = assert!(LOCAL_BATCH_RECIPIENTS_MAX <= LOCAL_JOBS_QUEUED_MAX);
const _: () = assert!(LOCAL_BATCHES_IN_FLIGHT_MAX <= LOCAL_WRITES_IN_FLIGHT_MAX);
const _: () = assert!(LOCAL_WRITER_THREADS_COUNT <= LOCAL_SYNC_THREADS_COUNT);
const _: () = assert!(LOCAL_MAILBOX_NAME_BYTES_MAX <= SMTP_LOCAL_PART_BYTES_MAX);

// DNS: the receive buffer holds what we advertise; the negative default is within the negative cap, which is
// within the positive one.
const _: () = assert!(DNS_UDP_BUFFER_BYTES >= DNS_EDNS_PAYLOAD_BYTES as usize);
const _: () = assert!(DNS_NEGATIVE_TTL_SECONDS_DEFAULT <= DNS_NEGATIVE_TTL_SECONDS_MAX);
const _: () = assert!(DNS_NEGATIVE_TTL_SECONDS_MAX <= DNS_POSITIVE_TTL_SECONDS_MAX);
const _: () = assert!(DNS_CNAME_HOPS_MAX <= DNS_ANSWER_RECORDS_MAX);

// Anvil: a delayed AUTH answer comes well within the default `smtpd_timeout` (300 s).
const _: () = assert!(ANVIL_DELAY_MAX.as_secs() < 300);
// A queue id has 8 bits for the shard.
const _: () = assert!(SHARDS_MAX <= u8::MAX as usize + 1);
// HTTP: the per-connection deadlines nest (head within an I/O wait within a connection's life), and the
// token bounds are ordered; every destination a shard keeps can be shown.
const _: () = assert!(HTTP_HEADER_READ_TIMEOUT.as_millis() <= HTTP_IO_TIMEOUT.as_millis());
const _: () = assert!(HTTP_IO_TIMEOUT.as_millis() < HTTP_CONNECTION_LIFETIME_MAX.as_millis());
const _: () = assert!(HTTP_TIMER_TICK_INTERVAL.as_millis() < HTTP_HEADER_READ_TIMEOUT.as_millis());
const _: () = assert!(HTTP_TOKEN_BYTES_MIN <= HTTP_TOKEN_BYTES_MAX);
const _: () = assert!(METRICS_DESTINATIONS_EXPORTED_MAX >= METRICS_DESTINATIONS_PER_SHARD_MAX);
