// Package bench is Hermod's load harness: the parts operators and the
// end-to-end tests use to drive any SMTP server. It speaks only SMTP and
// DNS on sockets and imports nothing of Hermod's own packages, so it
// measures Hermod, Postfix or any other MTA the same way.
//
// The parts:
//
//   - Sink: a fast SMTP sink MX on one or many addresses, with fault
//     injection (Faults), body verification, per-(message, recipient)
//     delivery records and an HTTP/JSON endpoint.
//   - DNS: an authoritative test DNS server for the generated domains
//     d0001.test… (TestDomain) whose MX hosts point at sink addresses, plus
//     explicit zones (several MX, null MX, NXDOMAIN, SERVFAIL, delays).
//   - Generator and CheckMessage: the message format shared by the load and
//     the sink (X-Bench-Id, X-Bench-Sent, X-Bench-Sum).
//   - Load: the load generator, closed or open loop, with latency
//     histograms.
//   - Ledger and SinkClient: loss and duplicate accounting between what a
//     target accepted and what the sink received.
//   - Scenario: named runs, built in under bench/scenarios.
//   - Run and Compare: a scenario against a Target — HermodTarget (the
//     hermod binary on a generated configuration), PostfixTarget (the
//     system's Postfix as a loopback relay), ExternalTarget (an MTA already
//     running) or DirectTarget (the load straight into the sink: the
//     harness's ceiling) — reported as text, JSON (Report, Comparison) and
//     a self-contained HTML page with charts.
//
// # Invariants
//
// Every message the generator makes carries a unique id (run tag and
// sequence number), the time it was handed to the socket and a CRC-32C of
// its body (the bytes after the first empty line, before dot-stuffing).
// The MTA under test may change the header section (it adds Received:), so
// only the body is verified; a body that does not match is counted as
// corrupted, never dropped or repaired. Deliveries are keyed by (id,
// recipient): an MTA that splits a message by destination delivers each
// pair once, and a pair delivered twice is a duplicate.
//
// A Load always stops by itself: it starts no message after Messages have
// been started or Duration has passed, and closes its connections Timeout
// after that. Messages are attempted once; each ends in exactly one class
// (accepted, rejected, tempfailed, failed) and the classes add up to
// Attempted.
//
// Fault decisions of the sink come from a per-connection random stream
// seeded by SinkConfig.Seed and the connection's accept order, so a run
// over one connection at a time is reproducible.
//
// # Failures
//
// A sink or DNS that cannot listen fails at construction (NewSink,
// NewDNS) and holds nothing. A broken client connection ends that
// connection only. A target that refuses, hangs or closes costs the
// load's session a reconnect (with a growing pause, at most 1 s) and the
// message under way is counted as failed, or tempfailed on a 421. A
// target that does not start is an error of Run, and whatever it started
// is stopped; a target that dies during the run makes the run an error
// after its report is made. Lost or corrupted mail is not an error of Run:
// it is in the report (Report.Problems). When the context ends, Run stops
// the load and the target and returns what it measured with the context's
// error.
//
// On disk: the sink, the DNS and the load write nothing. A run makes a
// temporary directory per target run (configuration, spool, logs, TLS
// certificates), removed afterwards unless kept; PostfixTarget rewrites
// the system's Postfix configuration (main.cf, master.cf and its own
// files under /etc/postfix) and purges Postfix's queue.
//
// # Measured ceiling
//
// Load straight into Sink over loopback on the 2-core development VM, 1 KiB
// messages, 50 sessions reusing connections (BenchmarkLoadToSink, one
// process, quiet machine): about 40,000–47,000 msg/s with pipelining (one
// round trip per message: the data and the next envelope go in one write)
// and 13,000–16,000 msg/s one command at a time, at about 40 and 110 µs
// of CPU per message for both sides together. Postfix's smtp-source into
// smtp-sink does 8,000–13,000 msg/s on the same machine.
package bench
