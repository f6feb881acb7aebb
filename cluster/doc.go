// Package cluster makes several Hermod nodes act as one MTA: serf gossip
// membership, cluster-wide per-domain connection limits, replication of
// every accepted message to peers before its 250, takeover of a failed
// peer's mail and SMTP addresses, and reconciliation when it returns.
//
// Invariants:
//   - A message acknowledged by a node with Replicas = R ≥ 1 is fsynced
//     in that node's spool and in the replica store of up to R peers
//     (fewer only when fewer peers were alive and RequireReplicas is off;
//     that shortfall is counted). Losing the node and R−1 holders loses
//     nothing.
//   - A failed node's copies are delivered by exactly one survivor when
//     the survivors agree on who is alive: the first alive holder in the
//     message's peers list (spool.Message.Peers, fixed at acceptance).
//     The survivor records what it took over (fsynced) before delivering.
//   - A node that restarts asks its peers what they took over and drops
//     those messages before it delivers (Reconcile), so a takeover
//     duplicates only deliveries that were in flight at the failure.
//
// Failure windows (documented in docs/CLUSTER.md and tested there):
//   - Outcome frames are best effort: if one is lost, the copy keeps
//     recipients already delivered until the next check with the origin
//     (every minute, copies older than 5 minutes: a copy whose message
//     the origin no longer has is dropped); a takeover before that
//     repeats them.
//   - In a partition both sides believe the other failed: the holders
//     deliver the other side's copies while the origin delivers them too
//     (duplicates, never loss); on healing the origin drops what was
//     taken over.
//   - Mail taken over from a failed node is not copied again: until it
//     is delivered it lives on one node (replicas = 2 covers a second
//     failure in that window).
//
// Nothing here blocks the SMTP event loops: replication completes
// through callbacks, gossip and takeover run on their own goroutines.
package cluster
