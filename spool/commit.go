package spool

import (
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// writeReq is one queued write: a Commit (encoded by the worker, so that
// compression runs off the caller's goroutine) or a pre-encoded batch from
// Update, Reschedule or Delete.
type writeReq struct {
	msg   *Message
	body  []byte
	batch *pebble.Batch
	delta int64 // change of the message count once durable
	due   int64 // due value of a due entry the write Sets; noDue if none
	done  func(error)
	// centry is the commit's entry in the recipient cache, if any.
	centry *rcacheEntry
	// lazy: done runs once the write is in the WAL and the memtable,
	// without waiting for its fsync (UpdateLazy).
	lazy bool

	finished atomic.Bool
}

func (r *writeReq) size() int {
	if r.batch != nil {
		return r.batch.Len()
	}
	return len(r.body) + 256*len(r.msg.Rcpts)
}

// worker is one commit goroutine's state.
type worker struct {
	mu  sync.Mutex
	cur []*writeReq // group in flight; failPending fails it if pebble hangs

	group, ok []*writeReq
	key, val  []byte
}

// finish completes r exactly once; it reports whether this call did.
func (s *Store) finish(r *writeReq, err error) bool {
	if !r.finished.CompareAndSwap(false, true) {
		return false
	}
	if err != nil {
		s.commitErrors.Add(1)
	}
	r.done(err)
	return true
}

// work is a commit worker: it takes one queued write, adds whatever else is
// queued (up to maxGroupReqs / maxGroupBytes), and writes the group as one
// synced pebble batch, leaving the wait for its fsync to the syncer.
//
// A worker takes writes off the queue only while it holds the gate, which
// the syncer hands back once the previous group's fsync is done: so the
// writes that arrive during one fsync form one group, one pebble batch and
// one WAL write for the next fsync, instead of one small batch each (every
// batch costs a commit-pipeline pass, a WAL write(2) and a hand-off to the
// syncer, for the same fsync). When writes are already waiting as an fsync
// ends, the syncer writes the next group itself (see syncLoop).
func (s *Store) work(w *worker) {
	defer s.wg.Done()
	for {
		<-s.gate
		r, open := <-s.queue
		if !open {
			s.gate <- struct{}{}
			return
		}
		if !s.commitFrom(w, r) {
			s.gate <- struct{}{}
		}
	}
}

// commitFrom forms a group of r and whatever else is queued (up to
// maxGroupReqs / maxGroupBytes) and writes it; the caller holds the gate.
// It reports whether the syncer took the group (and with it the gate).
func (s *Store) commitFrom(w *worker, r *writeReq) bool {
	group := append(w.group[:0], r)
	n := r.size()
gather:
	for len(group) < maxGroupReqs && n < s.maxGroupBytes {
		select {
		case r, open := <-s.queue:
			if !open {
				break gather
			}
			group = append(group, r)
			n += r.size()
		default:
			break gather
		}
	}
	taken := s.commitGroup(w, group)
	clear(group)
	w.group = group[:0]
	return taken
}

// commitGroup writes group; it reports whether the syncer took the group
// (and with it the gate).
func (s *Store) commitGroup(w *worker, group []*writeReq) bool {
	w.mu.Lock()
	w.cur = group
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		w.cur = nil
		w.mu.Unlock()
	}()
	if err := s.failed(); err != nil {
		for _, r := range group {
			s.finish(r, err)
		}
		return false
	}
	b := s.db.NewBatch()
	ok := w.ok[:0]
	for _, r := range group {
		var err error
		if r.msg != nil {
			err = s.encodeCommit(w, b, r)
		} else {
			err = b.Apply(r.batch, nil)
			// Copied into the group: back to pebble's pool, with its
			// buffer, for the next Update.
			_ = r.batch.Close()
			r.batch = nil
		}
		if err != nil {
			s.finish(r, err)
			continue
		}
		ok = append(ok, r)
	}
	if len(ok) == 0 {
		return false
	}
	s.commitBatches.Add(1)
	reqs := ok
	defer func() {
		clear(reqs)
		w.ok = reqs[:0]
	}()
	if allLazy(reqs) {
		// Nothing here needs its fsync now: the next synced group covers
		// it, or armLazySync's timer.
		err := s.apply(b, applyNoSync)
		s.lowerFloor(reqs)
		if err == nil {
			s.lazyGen.Add(1)
			s.armLazySync()
		}
		s.complete(b, reqs, err)
		return false
	}
	// This group's fsync covers every lazy group written before it.
	s.coveredGen.Store(s.lazyGen.Load())
	if s.waitApply {
		err := s.apply(b, applySync)
		s.lowerFloor(reqs)
		s.complete(b, reqs, err)
		return false
	}
	// Write the group to the WAL and the memtable without waiting for the
	// fsync; the syncer waits for it, completes the group and opens the
	// gate for the next one. Lazy writes of the group are done now.
	err := s.apply(b, applySyncNoWait)
	s.lowerFloor(reqs)
	if err != nil {
		s.complete(b, reqs, err)
		return false
	}
	synced := make([]*writeReq, 0, len(reqs))
	for _, r := range reqs {
		if r.lazy {
			s.completeOne(r, nil)
		} else {
			synced = append(synced, r)
		}
	}
	s.syncQ <- syncItem{b: b, reqs: synced}
	return true
}

// allLazy reports whether every write of reqs is lazy.
func allLazy(reqs []*writeReq) bool {
	for _, r := range reqs {
		if !r.lazy {
			return false
		}
	}
	return true
}

// armLazySync starts the timer that syncs lazy writes no synced group has
// covered within Config.LazySyncDelay, unless it is running.
func (s *Store) armLazySync() {
	if s.lazyArmed.CompareAndSwap(false, true) {
		s.lazyTimer.Reset(s.cfg.LazySyncDelay)
	}
}

// lazySync runs when the lazy-sync timer fires: when lazy groups were
// written since the last synced group, it queues a synced write of a
// log-only record, whose fsync covers them (the WAL is written in order).
func (s *Store) lazySync() {
	s.lazyArmed.Store(false)
	if s.coveredGen.Load() >= s.lazyGen.Load() || !s.enter() {
		return
	}
	defer s.exit()
	b := s.db.NewBatch()
	_ = b.LogData(lazySyncMark, nil)
	s.lazySyncs.Add(1)
	s.enqueue(&writeReq{batch: b, due: noDue, done: func(error) {}})
}

// lazySyncMark is the log-only record of a sync made for lazy writes
// (ignored when the WAL is replayed).
var lazySyncMark = []byte("hermod-lazy-sync")

// syncItem is a group written to the WAL whose fsync the syncer awaits.
type syncItem struct {
	b    *pebble.Batch
	reqs []*writeReq
}

// syncLoop waits, in WAL order, for the fsync of each group the workers
// wrote, and completes its writes.
//
// The syncer holds the gate while a group's fsync runs. When it ends and
// writes are already queued, the syncer writes the next group itself
// before completing the previous one: the next fsync starts without
// waiting for a worker to wake up (only the gate's holder takes from the
// queue, so a queued write is there for it to take). Otherwise it hands
// the gate back to the workers.
func (s *Store) syncLoop() {
	defer s.syncWG.Done()
	for it := range s.syncQ {
		err := it.b.SyncWait()
		if err != nil {
			// The WAL writer is dead after a write or sync error.
			err = s.fail(fmt.Errorf("pebble WAL sync: %w", err))
		}
		if !s.commitNext(err) {
			s.gate <- struct{}{}
		}
		s.complete(it.b, it.reqs, err)
	}
}

// commitNext writes the next group from the syncer when a write is queued
// and the store did not fail; it reports whether the syncer took that
// group (and so keeps the gate).
func (s *Store) commitNext(err error) bool {
	if err != nil || len(s.queue) == 0 {
		return false
	}
	select {
	case r, open := <-s.queue:
		if !open {
			return false
		}
		return s.commitFrom(s.syncWorker, r)
	default:
		return false
	}
}

// lowerFloor lowers the due floor for the due entries reqs set. It runs
// before anyone learns of the write (even a failed one may be visible:
// lowering is always safe).
func (s *Store) lowerFloor(reqs []*writeReq) {
	low := int64(noDue)
	for _, r := range reqs {
		low = min(low, r.due)
	}
	if low != noDue {
		s.floor.lower(low)
	}
}

// complete finishes the writes of a committed group.
func (s *Store) complete(b *pebble.Batch, reqs []*writeReq, err error) {
	if err == nil {
		_ = b.Close()
	}
	for _, r := range reqs {
		s.completeOne(r, err)
	}
}

// completeOne finishes one write of a committed group.
func (s *Store) completeOne(r *writeReq, err error) {
	if err == nil {
		s.messages.Add(r.delta)
		if r.msg != nil {
			s.commits.Add(1)
		}
	}
	if r.centry != nil {
		s.rcache.settle(r.msg.ID, r.centry, err == nil)
	}
	s.finish(r, err)
}

// applyMode says whether apply syncs the WAL and waits for it.
type applyMode uint8

const (
	// applySync: synced, apply waits for the fsync.
	applySync applyMode = iota
	// applySyncNoWait: synced; the caller waits with b.SyncWait.
	applySyncNoWait
	// applyNoSync: not synced (lazy writes; a later sync covers them).
	applyNoSync
)

// apply writes b to the WAL and the memtable, synced or not as mode says.
// Pebble treats a failed WAL write or sync as fatal: it calls
// Logger.Fatalf (whose adapter panics) or panics itself, possibly with its
// commit pipeline locked. Either way the panic is recovered here, the store
// enters the failed state, and the error is returned: nothing is
// acknowledged unless pebble reported a synced commit (or, for a lazy write,
// an applied one).
func (s *Store) apply(b *pebble.Batch, mode applyMode) (err error) {
	defer func() {
		if r := recover(); r != nil {
			var cause error
			switch v := r.(type) {
			case fatalPanic:
				cause = v.err
			case error:
				cause = v
			default:
				cause = fmt.Errorf("%v", v)
			}
			if _, ok := r.(fatalPanic); !ok {
				s.wedged.Store(true)
			}
			err = s.fail(fmt.Errorf("pebble commit: %w", cause))
		}
	}()
	switch mode {
	case applySyncNoWait:
		err = s.db.ApplyNoSyncWait(b, pebble.Sync)
	case applySync:
		err = b.Commit(pebble.Sync)
	default:
		err = b.Commit(pebble.NoSync)
	}
	if err != nil {
		return fmt.Errorf("spool: commit: %w", err)
	}
	return nil
}

// failPending fails every write in flight in a worker (one may be stuck in
// pebble for good) and then every write still queued, until Close closes
// the queue.
func (s *Store) failPending(err error) {
	for _, w := range append(s.workers[:len(s.workers):len(s.workers)], s.syncWorker) {
		w.mu.Lock()
		for _, r := range w.cur {
			s.finish(r, err)
		}
		w.mu.Unlock()
	}
	for r := range s.queue {
		s.finish(r, err)
	}
}

// encodeCommit adds the records of a new message to b: envelope, body,
// recipients and its one due entry. Nothing is added when it fails.
func (s *Store) encodeCommit(w *worker, b *pebble.Batch, r *writeReq) error {
	m := r.msg
	body, err := s.codec.appendBody(w.val[:0], r.body)
	if err != nil {
		return fmt.Errorf("spool: commit %s: %w", m.ID, err)
	}
	w.val = body
	w.key = bodyKey(w.key[:0], m.ID)
	_ = b.Set(w.key, body, nil)

	w.val = appendEnvelope(w.val[:0], m)
	w.key = envKey(w.key[:0], m.ID)
	_ = b.Set(w.key, w.val, nil)

	due := int64(math.MaxInt64)
	for i := range m.Rcpts {
		rc := &m.Rcpts[i]
		w.val = appendRecipient(w.val[:0], rc)
		w.key = rcptKey(w.key[:0], m.ID, rc.Index)
		_ = b.Set(w.key, w.val, nil)
		due = min(due, dueNanos(rc.NextAttempt))
	}
	w.key = dueKey(w.key[:0], due, m.ID)
	w.val = appendDueHint(w.val[:0], m.Rcpts)
	_ = b.Set(w.key, w.val, nil)
	r.due = due
	r.centry = s.rcache.add(m.ID, m.Rcpts)
	return nil
}

// prepareCommit checks msg and fills in what Commit assigns.
func (s *Store) prepareCommit(msg *Message, body []byte) error {
	if msg == nil {
		return fmt.Errorf("%w: nil message", ErrInvalid)
	}
	if len(msg.Rcpts) == 0 || len(msg.Rcpts) > maxRcpts {
		return fmt.Errorf("%w: %d recipients", ErrInvalid, len(msg.Rcpts))
	}
	if len(body) > maxBodyLen {
		return fmt.Errorf("%w: body of %d bytes", ErrInvalid, len(body))
	}
	if msg.ID.IsZero() {
		msg.ID = s.NewID()
	}
	if msg.Received.IsZero() {
		msg.Received = s.clock()
	}
	msg.Size = int64(len(body))
	for i := range msg.Rcpts {
		r := &msg.Rcpts[i]
		if r.Addr == "" {
			return fmt.Errorf("%w: recipient %d has no address", ErrInvalid, i)
		}
		r.Index = uint16(i)
		if r.Domain == "" {
			r.Domain = domainOf(r.Addr)
		}
		r.State = Pending
		if r.NextAttempt.IsZero() {
			r.NextAttempt = msg.Received
		}
	}
	return nil
}

// Commit makes a new message durable: envelope, body (compressed by a
// commit worker) and all recipients (Pending; NextAttempt defaults to
// msg.Received) plus its due entry, in one synced write grouped with
// concurrent commits.
//
// Before returning, Commit assigns msg.ID when zero, msg.Received when zero,
// msg.Size, and each recipient's Index (its position), Domain (when empty),
// State (Pending) and NextAttempt (when zero). The ID must not already be
// queued. From then on the store owns msg and body: the caller must not
// modify them.
//
// done is called exactly once, from a spool goroutine, with nil only when
// the message is durable (fsynced); with an error it may or may not have
// been stored (report a temporary failure). done must not block: it runs
// on the goroutine that acknowledges every write in turn. A nil done is
// allowed.
//
// Commit never waits for the disk, but it blocks while the bounded commit
// queue (Config.CommitQueue) is full: backpressure when the disk cannot keep
// up.
func (s *Store) Commit(msg *Message, body []byte, done func(error)) {
	if done == nil {
		done = func(error) {}
	}
	if err := s.prepareCommit(msg, body); err != nil {
		s.commitErrors.Add(1)
		go done(err)
		return
	}
	s.enqueue(&writeReq{msg: msg, body: body, delta: 1, due: noDue, done: done})
}

// CommitWait is Commit that waits for the result.
func (s *Store) CommitWait(msg *Message, body []byte) error {
	ch := make(chan error, 1)
	s.Commit(msg, body, func(err error) { ch <- err })
	return <-ch
}

// enqueue hands r to the commit workers, or completes it with an error.
func (s *Store) enqueue(r *writeReq) {
	if !s.enter() {
		s.commitErrors.Add(1)
		go r.done(ErrClosed)
		return
	}
	defer s.exit()
	if err := s.failed(); err != nil {
		s.commitErrors.Add(1)
		go r.done(err)
		return
	}
	select {
	case s.queue <- r:
	case <-s.failedCh:
		// failPending completes r if the send above won the race.
		if r.finished.CompareAndSwap(false, true) {
			s.commitErrors.Add(1)
			go r.done(s.failed())
		}
	}
}

// write commits b (grouped) and waits for the result: for its fsync, or
// only for the WAL and memtable write when lazy. due is the due value of
// the due entry b Sets, or noDue.
func (s *Store) write(b *pebble.Batch, delta, due int64, lazy bool) error {
	w, _ := s.waiters.Get().(*waiter)
	if w == nil {
		ch := make(chan error, 1)
		w = &waiter{ch: ch, done: func(err error) { ch <- err }}
	}
	// The request is new each time (it may be referenced by a worker for a
	// moment after it completed); its done is called exactly once, so the
	// channel is empty again when w goes back to the pool.
	s.enqueue(&writeReq{batch: b, delta: delta, due: due, done: w.done, lazy: lazy})
	err := <-w.ch
	s.waiters.Put(w)
	return err
}

// waiter is the completion channel of a waiting write and the callback
// that fills it, reused across writes.
type waiter struct {
	ch   chan error
	done func(error)
}

// earliestPending returns the due value (see dueNanos) of the earliest
// NextAttempt among pending recipients; ok is false when none is pending.
func earliestPending(rcpts []Recipient) (due int64, ok bool) {
	due = math.MaxInt64
	for i := range rcpts {
		if rcpts[i].State == Pending {
			due, ok = min(due, dueNanos(rcpts[i].NextAttempt)), true
		}
	}
	return due, ok
}

// Update records delivery outcomes. Each element of updates replaces the
// dynamic fields (State, Attempts, NextAttempt, LastAttempt, LastReply) of
// the recipient with the same Index; the static fields (Addr, Domain,
// ORcpt, Notify) stay as committed. The due entry moves to the new earliest
// NextAttempt of the pending recipients; when none is pending the whole
// message is removed and removed is true.
//
// The recipient records are those of the recipient cache when the message
// was committed by this process and not yet deferred (see rcptCache), else
// read from pebble.
//
// The write is synced and grouped with concurrent Updates and Commits;
// Update returns once it is durable. Calls for different IDs may run
// concurrently from many goroutines; calls for one ID are serialized.
// Errors: ErrNotFound, ErrUnknownRecipient (nothing written), ErrClosed,
// ErrFailed.
func (s *Store) Update(id ID, updates []Recipient) (removed bool, err error) {
	return s.update(id, updates, false)
}

// UpdateLazy is Update without the wait for the fsync: it returns once the
// write is in the WAL and the memtable (visible to reads), and the write
// becomes durable with the next synced write, or at the latest
// Config.LazySyncDelay later. It is for outcomes whose loss in a crash
// only repeats work: a delivery (the mail is delivered again) or a
// deferral (it is retried sooner), never for a write that must precede an
// acknowledgement.
func (s *Store) UpdateLazy(id ID, updates []Recipient) (removed bool, err error) {
	return s.update(id, updates, true)
}

func (s *Store) update(id ID, updates []Recipient, lazy bool) (removed bool, err error) {
	return s.modify(id, lazy, func(rcpts []Recipient) ([]int, error) {
		changed := make([]int, 0, len(updates))
		for _, u := range updates {
			j := findRcpt(rcpts, u.Index)
			if j < 0 {
				return nil, fmt.Errorf("%w: %s has no recipient %d", ErrUnknownRecipient, id, u.Index)
			}
			if u.State >= numRcptStates {
				return nil, fmt.Errorf("spool: update %s: bad state %d", id, u.State)
			}
			r := &rcpts[j]
			r.State, r.Attempts, r.NextAttempt, r.LastAttempt, r.LastReply =
				u.State, u.Attempts, u.NextAttempt, u.LastAttempt, u.LastReply
			changed = append(changed, j)
		}
		s.updates.Add(1)
		return changed, nil
	})
}

// Reschedule sets NextAttempt = at for every pending recipient of id (the
// admin "flush"), moving its due entry.
func (s *Store) Reschedule(id ID, at time.Time) error {
	_, err := s.modify(id, false, func(rcpts []Recipient) ([]int, error) {
		var changed []int
		for j := range rcpts {
			if rcpts[j].State == Pending {
				rcpts[j].NextAttempt = at
				changed = append(changed, j)
			}
		}
		return changed, nil
	})
	return err
}

// Delete removes id with all its records (admin removal), or returns
// ErrNotFound.
func (s *Store) Delete(id ID) error { return s.delete(id, false) }

// DeleteLazy is Delete without the wait for the fsync (see UpdateLazy):
// for a removal whose loss in a crash only repeats work, such as a cluster
// replica of mail its origin delivered.
func (s *Store) DeleteLazy(id ID) error { return s.delete(id, true) }

func (s *Store) delete(id ID, lazy bool) error {
	_, err := s.modify(id, lazy, func(rcpts []Recipient) ([]int, error) {
		for j := range rcpts {
			if rcpts[j].State == Pending {
				rcpts[j].State = Expired
			}
		}
		return nil, nil
	})
	return err
}

func findRcpt(rcpts []Recipient, idx uint16) int {
	if int(idx) < len(rcpts) && rcpts[idx].Index == idx {
		return int(idx)
	}
	for j := range rcpts {
		if rcpts[j].Index == idx {
			return j
		}
	}
	return -1
}

// modify is the read-modify-write behind Update, Reschedule and Delete. It
// reads id's recipient records, lets change edit them (returning which
// ones to rewrite), and writes the rewritten records and the moved due
// entry, or the removal of the message when no recipient is pending; it
// waits for the fsync unless lazy.
//
// Every key is written so that SingleDelete is valid for it: a recipient
// record is rewritten as SingleDelete+Set (each Set sits between two
// deletes), the due entry is only Set when it moves, and a removed
// message's keys each get one SingleDelete.
func (s *Store) modify(id ID, lazy bool, change func([]Recipient) ([]int, error)) (removed bool, err error) {
	if !s.enter() {
		return false, ErrClosed
	}
	defer s.exit()
	if err := s.failed(); err != nil {
		return false, err
	}
	l := s.lockID(id)
	l.Lock()
	defer l.Unlock()

	// Taken out of the cache: an error below leaves the message uncached.
	rcpts := s.rcache.take(id)
	if rcpts == nil {
		if rcpts, err = s.readRcpts(id); err != nil {
			return false, err
		}
	}
	if len(rcpts) == 0 {
		return false, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	oldDue, hadDue := earliestPending(rcpts)
	changed, err := change(rcpts)
	if err != nil {
		return false, err
	}
	newDue, pending := earliestPending(rcpts)

	b := s.db.NewBatch()
	var k [dueKeyLen]byte
	var delta int64
	if !pending {
		s.appendRemoval(b, id, rcpts)
		delta = -1
	} else {
		var v []byte
		for _, j := range changed {
			key := rcptKey(k[:0], id, rcpts[j].Index)
			v = appendRecipient(v[:0], &rcpts[j])
			_ = b.SingleDelete(key, nil)
			_ = b.Set(key, v, nil)
		}
	}
	// The due entry is rewritten whenever the message stays pending: its
	// value (the hint) names the pending recipients' domains, which the
	// change may have altered even when the due time did not move.
	if hadDue {
		_ = b.SingleDelete(dueKey(k[:0], oldDue, id), nil)
	}
	setDue := int64(noDue)
	if pending {
		_ = b.Set(dueKey(k[:0], newDue, id), appendDueHint(nil, rcpts), nil)
		setDue = newDue
	}
	if b.Empty() {
		_ = b.Close()
		return false, nil
	}
	if err := s.write(b, delta, setDue, lazy); err != nil {
		return false, err
	}
	if !pending {
		s.removals.Add(1)
	} else {
		s.rcache.put(id, rcpts, s.clock())
	}
	return !pending, nil
}

// appendRemoval deletes all of a message's records (not its due entry).
func (s *Store) appendRemoval(b *pebble.Batch, id ID, rcpts []Recipient) {
	var k, k2 [rcptKeyLen]byte
	if s.removeWithRangeDel {
		_ = b.DeleteRange(msgKey(k[:0], id, suffixEnv), msgKey(k2[:0], id, suffixEnd), nil)
		return
	}
	_ = b.SingleDelete(envKey(k[:0], id), nil)
	_ = b.SingleDelete(bodyKey(k[:0], id), nil)
	for i := range rcpts {
		_ = b.SingleDelete(rcptKey(k[:0], id, rcpts[i].Index), nil)
	}
}

// maxDueHint bounds a due entry's hint; a longer one is left empty
// ("unknown": the reader loads the message).
const maxDueHint = 256

// appendDueHint appends the distinct domains of the pending recipients,
// comma-separated, or nothing when they do not fit in maxDueHint.
func appendDueHint(dst []byte, rcpts []Recipient) []byte {
	start := len(dst)
	for i := range rcpts {
		r := &rcpts[i]
		if r.State != Pending {
			continue
		}
		dup := false
		for j := 0; j < i; j++ {
			if rcpts[j].State == Pending && rcpts[j].Domain == r.Domain {
				dup = true
				break
			}
		}
		if dup {
			continue
		}
		if len(dst) > start {
			dst = append(dst, ',')
		}
		dst = append(dst, r.Domain...)
		if len(dst)-start > maxDueHint {
			return dst[:start]
		}
	}
	return dst
}
