// Package engine is Hermod's mail logic between the wire and the disk: the
// inbound session policy (Receiver) and, fed by it, the per-destination
// delivery scheduler.
//
// Data path: netio.Server parses SMTP and asks the Receiver for decisions
// (relay policy per RCPT, synchronously and from memory) and for the commit
// at end of data. The Receiver adds the Received: header, assigns the queue
// id and commits the message to the spool asynchronously; the client's 250
// is written only after the spool reports the message durable (fsynced),
// then the message goes straight to the scheduler.
//
// Invariants: nothing is acknowledged that is not durable; a spool failure
// answers 451 4.3.0 (the client keeps the message); every state change of a
// queued message is written to the spool before it is acted on. A bounce's
// outcome is durable before the scheduler moves on; a delivery's or a
// deferral's is written without waiting for its fsync (spool.UpdateLazy),
// so that a crash of the machine within the spool's lazy_sync_delay can
// only make that mail be tried again, never lose it.
package engine
