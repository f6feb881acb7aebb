// Package dnscache is Hermod's local MX/A/AAAA resolver cache. The delivery
// scheduler asks it where mail for a domain goes (Cache.Resolve); it answers
// from memory almost always, and from the configured recursive resolvers
// (github.com/miekg/dns over UDP with EDNS0, TCP on truncation) otherwise.
//
// # Invariants
//
//   - Names are normalised before use: ASCII lower case, no trailing dot,
//     at most 253 characters, labels of 1–63 letters, digits, '-' or '_'.
//     Anything else (including non-ASCII: IDNA is the caller's job) is
//     rejected with a permanent KindInvalidName error and never queried.
//   - A cached answer is immutable once published. Slices handed out on the
//     hit path (LookupIP's result, Host.Addrs) are shared with the cache and
//     must not be modified. Route.Hosts and LookupMX's result are fresh copies
//     per call: equal preferences are shuffled there, never in the cache.
//   - Positive answers live for the smallest TTL of the RRsets used (CNAME
//     chain included), clamped to [MinTTL, MaxTTL]. NXDOMAIN and NODATA live
//     for min(SOA TTL, SOA MINIMUM) (RFC 2308), clamped to
//     [MinTTL, NegativeTTL]; MinTTL when the reply carries no SOA.
//   - At most one upstream query per (name, type) is in flight: concurrent
//     misses share its result (single-flight). A caller whose context ends
//     stops waiting; the query itself runs on and fills the cache.
//   - The cache holds at most MaxEntries entries (one per name for MX, one
//     per name for A+AAAA). Inserting into a full shard evicts an entry that
//     is past any use, else the least recently used of a small sample.
//   - Nothing here is global; a Cache registers no metrics by itself.
//
// # Failure behaviour
//
// Every error returned is a *Error whose Kind says what happened and whose
// Permanent method says what the mail should do:
//
//   - NXDOMAIN, NODATA, invalid names and "no MX host has an address, and
//     every host failed permanently" are permanent: the message bounces.
//   - SERVFAIL, REFUSED, timeouts, network errors, malformed replies, a
//     cancelled context and a closed cache are temporary: the message is
//     deferred. Anything unknown is temporary.
//
// An upstream query tries every resolver, starting at a rotating position,
// for Attempts rounds, each try bounded by Timeout. A resolver that times
// out, cannot be reached or REFUSES is skipped for ResolverHoldDown (unless
// every resolver is being skipped, in which case all are tried). SERVFAIL
// moves on to the next resolver without blaming the one that said it.
//
// When every resolver fails temporarily and an expired positive answer is at
// most StaleTTL past its expiry, that answer is served instead (RFC 8767) and
// kept for another 30 s before the resolvers are tried again. Negative
// answers are never served stale: a bounce needs fresh evidence.
//
// Hot names are refreshed in the background: a hit in the last
// PrefetchFraction of an entry's lifetime starts one refresh, so names that
// are still being used never expire in the delivery path. A failed refresh
// leaves the current answer in place.
//
// Resolve looks up MX, then the addresses of every MX host. A host whose
// address lookup fails is kept with Host.Err set; the route is returned
// while at least one host has an address. No MX records (NODATA) means the
// domain is its own host (RFC 5321 §5.1, Route.Implicit); a lone MX "."
// means the domain accepts no mail (RFC 7505, Route.NullMX).
//
// # Concurrency
//
// All methods of *Cache are safe for concurrent use. The hit path takes one
// shard read lock per name looked up (the MX name, then each host) and
// allocates only the Route that Resolve returns; ResolveInto with a reused
// Route, LookupIP and the hit checks allocate nothing. Misses, prefetches
// and upstream queries allocate freely.
package dnscache
