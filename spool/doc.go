// Package spool is Hermod's durable message queue: envelopes, bodies and
// per-recipient delivery state in a pebble (v2) database, written so that a
// message is acknowledged to the SMTP client only once it is on disk.
//
// # Layout
//
// Keys (docs/DESIGN.md):
//
//	'm' id(10) 0x00            envelope record (immutable)
//	'm' id(10) 0x01            body record (compressed; immutable)
//	'm' id(10) 0x02 idx(2 BE)  recipient record
//	'd' due(8 BE) id(10)       due index entry (empty value)
//
// Records are compact binary: a version byte, then varints and
// length-prefixed strings. Each is self-contained (the envelope carries its
// ID; the body record carries its codec and uncompressed length), so
// records can later be shipped to cluster peers as they are. Decoding
// never panics, whatever the bytes (fuzzed).
//
// # Invariants
//
//   - A queued message has its envelope, its body, one record per recipient,
//     at least one Pending recipient, and exactly one due entry, whose time
//     is the earliest NextAttempt of its Pending recipients.
//   - A message with no Pending recipient is not stored: the Update that
//     finishes its last recipient removes all its keys in the same batch.
//   - Every key is written so that pebble's SingleDelete is valid for it:
//     envelope and body are Set once; a recipient record is rewritten as
//     SingleDelete+Set; a due entry is Set only when it moves (SingleDelete
//     of the old one). Removal is one SingleDelete per key, so a message
//     delivered before its memtable is flushed leaves nothing at all behind
//     (Set and SingleDelete annihilate in the flush).
//   - Stats.Messages is the number of due entries: counted at Open, then
//     +1 per durable Commit and -1 per removal (durable, or for UpdateLazy
//     written).
//   - IDs from NewID strictly increase, also across restarts: Open starts
//     above the largest stored ID even if the clock went back.
//
// Removal deliberately uses point SingleDeletes rather than one DeleteRange
// over the message prefix. Pebble caches the fragmented range tombstones of
// a memtable and rebuilds that cache from all of them whenever a new one is
// added, so every read that follows a removal costs O(range tombstones in
// the memtable). BenchmarkUpdate (50 goroutines, remove after read, 20,000
// messages) measured 32,000-39,000 updates/s with SingleDeletes and 1,060/s
// (and 390 KB allocated per op) with DeleteRange.
//
// # Writes and group commit
//
// Commit and the read-modify-write calls (Update, Reschedule, Delete) put
// their writes on a bounded queue (Config.CommitQueue). A gate lets one
// group form at a time: the worker holding it takes what is queued (up to
// 512 writes, or 4 MiB), encodes it into one pebble batch (compressing
// bodies there, off the caller's goroutine) and writes it to the WAL and
// the memtable with a synced ApplyNoSyncWait; the syncer goroutine waits
// for that batch's fsync, completes its writes and then either writes the
// next group itself, when writes are already waiting, or hands the gate
// back to the workers. So writes arriving while an fsync runs all wait for
// the next group: one fsync per group, 12.8 messages per pebble batch and
// about 0.05 fsyncs per relayed message under 50 sessions (measured by the
// relay benchmark, 2026-11-23; the earlier design, workers never waiting
// for fsyncs, wrote 0.57 messages per batch and 0.078 fsyncs per message).
// Waiting in Apply instead (workers blocked on their own fsync) measured
// 0.055-0.062 fsyncs per message with 2-8 workers and up to 40% lower
// throughput with 1 ms fsyncs (BenchmarkCommitParallel, apply=wait).
// Throughput is about (messages per fsync) / (fsync latency). Workers
// other than the gate's holder only wait. A full queue blocks Commit: that
// is the backpressure when the disk cannot keep up.
//
// Commit's done callback runs on the syncer (or, for errors found before
// queueing, on a new goroutine), exactly once, with nil only when the write
// is durable. Update and friends block until durable.
//
// UpdateLazy (delivery outcomes) blocks only until its group is in the WAL
// and the memtable. A group of lazy writes alone is written without a
// sync; the fsync of the next synced group covers it, since the WAL is
// written and replayed in order, and when none comes within
// Config.LazySyncDelay (100 ms) the store queues a synced log-only record
// itself (hermod_spool_lazy_syncs_total). Lazy writes in a synced group
// complete before its fsync. A crash can therefore undo a lazy outcome
// (the mail is delivered again) but never expose a later write without it.
// Under steady-1k this took the WAL syncs per relayed message from
// 0.065-0.080 to 0.046-0.048, and at 2,000 msg/s from 0.47-0.57 to
// 0.31-0.34 (2026-11-24). Calls for one ID are
// serialized by striped locks. As with any pebble write, a write becomes
// visible to reads (Load, Due, Walk) a moment before its fsync completes;
// if that fsync fails, the store fails (below).
//
// # Failure behaviour
//
//   - Invalid input (no recipients, empty address, nil message): ErrInvalid,
//     nothing written.
//   - A pebble write or fsync error on the WAL is fatal to pebble: its
//     commit path calls Logger.Fatalf (its default logger exits the
//     process; worse, if Fatalf returned, Apply would report the unsynced
//     batch as committed) or panics with its commit pipeline locked. The
//     spool's logger adapter therefore marks the store failed and panics;
//     the commit worker recovers, and every write of that group, every
//     write in flight in other workers and every write queued or made later
//     fails with ErrFailed. A failed fsync reported to the syncer
//     (Batch.SyncWait) does the same. Nothing is ever acknowledged unless pebble
//     returned normally from a synced commit. Reads keep working. Close
//     returns the failure (abandoning, after 5 s, a worker stuck in
//     pebble); the process should reopen the store (or restart), which
//     replays the WAL: every acknowledged write is there, writes that
//     failed may or may not be (so a failed message is reported to the SMTP
//     client as a temporary error, and may be delivered anyway: at least
//     once, never lost).
//   - Pebble calls Fatalf from background work too (e.g. a MANIFEST write
//     failing during a flush). The adapter marks the store failed and
//     panics there as well, which ends the process like pebble's own
//     logger would: pebble's state is undefined afterwards, and everything
//     acknowledged is in the WAL for the next Open.
//   - A flush that fails with ENOSPC fails the store too: pebble would
//     retry it at once, forever, while the memtables fill and writes
//     stall. Other pebble errors (compaction and other flush I/O errors,
//     which pebble retries) are logged through the event listener.
//   - Running out of space is kept from happening: HasRoom reports false
//     while the filesystem has less than Config.MinFree (64 MiB) plus
//     half the spool's size free beyond the message (compactions write
//     before they delete), and the daemon then answers MAIL with 452 4.3.1,
//     while deliveries go on and free space. Failed() tells the daemon
//     when the store failed anyway; it stops, to be restarted (systemd's
//     Restart=on-failure) with a reopened store (tested end to end on a
//     real full tmpfs: cmd/hermod TestE2EFullDisk).
//   - A crash at any point loses nothing acknowledged: Open replays the WAL,
//     and Due/Walk find every acknowledged message (tested with crash clones
//     of vfs.NewCrashableMem, with copies of a live directory and with
//     ENOSPC injected by vfs/errorfs).
//
// # Pebble settings
//
// FormatNewest; logging through slog; 64 MiB memtables (stall at 4) so that
// most messages are written and removed within one memtable; L0 compaction
// from 2 sub-levels, so that Sets that survived a flush meet their
// SingleDeletes soon; writes stop only at 32 L0 sub-levels (a stall is
// backpressure on SMTP acks, not an error); bloom filters on all levels for
// Load/Body. File syncs are counted by wrapping the vfs.FS
// (hermod_spool_fsyncs_total{file="wal"|"other"} and
// hermod_spool_fsync_duration_seconds).
//
// Scans of the due index start at an in-memory lower bound of the live due
// entries, so that the deleted entries of delivered messages still in the
// memtable are not stepped over on every NextDue (37 ms per call after
// 100,000 deliveries without it; 2-11 µs with it, BenchmarkNextDueAfterChurn).
package spool
