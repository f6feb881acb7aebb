package spool

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/bloom"
	"github.com/cockroachdb/pebble/v2/vfs"
)

// Errors returned by the spool.
var (
	// ErrNotFound: no message with that ID is queued.
	ErrNotFound = errors.New("spool: message not found")
	// ErrClosed: the store is closed or closing.
	ErrClosed = errors.New("spool: store closed")
	// ErrFailed: a write failed in a way pebble cannot recover from (e.g. a
	// WAL write or fsync error). The store rejects every later write; the
	// process should reopen it (see the package doc).
	ErrFailed = errors.New("spool: store failed")
	// ErrCorrupt: a stored record could not be decoded.
	ErrCorrupt = errors.New("spool: corrupt record")
	// ErrUnknownVersion: a record has a version this code does not know.
	ErrUnknownVersion = errors.New("spool: unknown record version")
	// ErrBadID: ParseID was given something that is not an ID.
	ErrBadID = errors.New("spool: bad id")
	// ErrInvalid: Commit was given an unusable message (no recipients, ...).
	ErrInvalid = errors.New("spool: invalid message")
	// ErrUnknownRecipient: Update named a recipient index the message lacks.
	ErrUnknownRecipient = errors.New("spool: unknown recipient")
)

// Commit grouping limits: a worker merges at most this many queued writes,
// or about this many bytes, into one synced pebble batch.
const (
	maxGroupReqs  = 512
	maxGroupBytes = 4 << 20
	idLockStripes = 4096
	closingBit    = 1 << 62
)

// Store is a durable message spool. All methods are safe for concurrent use.
type Store struct {
	cfg   Config
	log   *slog.Logger
	clock func() time.Time
	db    *pebble.DB
	codec *bodyCodec
	syncs syncStats

	lastMicros atomic.Int64

	// active counts calls in progress; closingBit is added by Close, which
	// then waits for the count to drain (see enter/exit).
	active    atomic.Int64
	closeOnce sync.Once
	drained   chan struct{}
	drainOnce sync.Once

	queue         chan *writeReq
	workers       []*worker
	syncWorker    *worker // the syncer's, when it writes a group itself
	wg            sync.WaitGroup
	maxGroupBytes int
	syncQ         chan syncItem
	// gate holds one token: the right to form and write the next group
	// (see work).
	gate   chan struct{}
	syncWG sync.WaitGroup

	failErr  atomic.Pointer[error]
	failedCh chan struct{}
	// wedged is set when pebble panicked inside its commit path, where it
	// may hold its commit pipeline lock for good.
	wedged       atomic.Bool
	closeTimeout time.Duration

	free    freeSpace // see HasRoom
	idLocks [idLockStripes]sync.Mutex
	floor   dueFloor
	rcache  rcptCache
	waiters sync.Pool // of *waiter, see write

	messages      atomic.Int64
	diskBytes     atomic.Uint64
	commits       atomic.Uint64
	commitBatches atomic.Uint64
	commitErrors  atomic.Uint64
	updates       atomic.Uint64
	removals      atomic.Uint64
	lazySyncs     atomic.Uint64

	// lazyGen counts the groups written without a sync (all UpdateLazy);
	// coveredGen is the lazyGen a synced group has covered since (see
	// armLazySync). Only the gate's holder writes groups, so each moves
	// in step with the WAL.
	lazyGen    atomic.Uint64
	coveredGen atomic.Uint64
	lazyArmed  atomic.Bool
	lazyTimer  *time.Timer

	// waitApply makes the workers wait for their own fsync (pebble's Apply)
	// instead of handing it to the syncer (ApplyNoSyncWait). Only
	// benchmarks set it; see the package doc.
	waitApply bool

	// removeWithRangeDel removes finished messages with one DeleteRange
	// instead of point SingleDeletes. Only tests and benchmarks set it; see
	// the package doc for why point deletes are the default.
	removeWithRangeDel bool
}

// Open opens (creating if needed) the spool in cfg.Dir, counts the queued
// messages from the due index and starts the commit workers. A nil logger
// discards logs.
func Open(cfg Config, logger *slog.Logger) (s *Store, err error) {
	cfg.EnsureDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	codec, err := newBodyCodec(cfg.Compression)
	if err != nil {
		return nil, err
	}
	s = &Store{
		cfg:     cfg,
		log:     logger,
		clock:   cfg.Clock,
		codec:   codec,
		drained: make(chan struct{}),
		queue:   make(chan *writeReq, cfg.CommitQueue),
		syncQ:   make(chan syncItem, 1024),
		gate:    make(chan struct{}, 1),

		closeTimeout: 5 * time.Second,
		failedCh:     make(chan struct{}),
	}
	if s.clock == nil {
		s.clock = time.Now
	}
	base := cfg.FS
	if base == nil {
		base = vfs.Default
	}
	fs := &countingFS{FS: base, stats: &s.syncs}
	if err := fs.MkdirAll(cfg.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("spool: create %s: %w", cfg.Dir, err)
	}
	s.workers = make([]*worker, cfg.CommitWorkers)
	for i := range s.workers {
		s.workers[i] = &worker{}
	}
	s.syncWorker = &worker{}
	s.lazyTimer = time.AfterFunc(time.Hour, s.lazySync)
	s.lazyTimer.Stop()
	s.maxGroupBytes = min(maxGroupBytes, int(cfg.MemTableSize/4))
	s.gate <- struct{}{}
	queue := s.queue
	defer func() {
		// pebble reports some open failures through Logger.Fatalf.
		if r := recover(); r != nil {
			fp, ok := r.(fatalPanic)
			if !ok {
				panic(r)
			}
			s, err = nil, fmt.Errorf("spool: open %s: %w", cfg.Dir, fp.err)
		}
		if err != nil {
			close(queue) // ends failPending, if a fatal error started it
		}
	}()
	if cfg.FS == nil {
		if err := checkOpenSpace(cfg.Dir); err != nil {
			return nil, fmt.Errorf("spool: open %s: %w", cfg.Dir, err)
		}
	}
	db, err := pebble.Open(cfg.Dir, s.pebbleOptions(fs))
	if err != nil {
		return nil, fmt.Errorf("spool: open %s: %w", cfg.Dir, err)
	}
	s.db = db
	if err := s.load(); err != nil {
		_ = db.Close()
		return nil, err
	}
	s.readFree()
	s.free.stop = make(chan struct{})
	go s.watchFree(s.free.stop)
	for _, w := range s.workers {
		s.wg.Add(1)
		go s.work(w)
	}
	s.syncWG.Add(1)
	go s.syncLoop()
	s.log.Info("spool opened", "dir", cfg.Dir, "messages", s.messages.Load(),
		"compression", cfg.Compression, "commit_workers", cfg.CommitWorkers)
	return s, nil
}

// pebbleOptions returns the pebble configuration for the spool's workload:
// every message is written once, read a few times and deleted soon after.
func (s *Store) pebbleOptions(fs vfs.FS) *pebble.Options {
	opts := &pebble.Options{
		FS:                 fs,
		FormatMajorVersion: pebble.FormatNewest,
		Logger:             pebbleLogger{log: s.log, fatal: func(err error) { s.fail(err) }},
		EventListener:      eventListener(s.log, func(err error) { s.fail(err) }),
		CacheSize:          s.cfg.CacheSize,
		// A big memtable lets a message's Set and SingleDelete meet in the
		// memtable flush, where both vanish: most messages never reach an
		// sstable.
		MemTableSize: uint64(s.cfg.MemTableSize),
		// Up to 4 memtables (one mutable, three flushing) before writes
		// stall: rides out a slow flush without stalling acks.
		MemTableStopWritesThreshold: 4,
		// Compact L0 early: data that survived a flush is the minority
		// (deferred mail), and compacting it soon lets Sets meet their
		// SingleDeletes, keeping reads (Due scans) cheap.
		L0CompactionThreshold: 2,
		// A stall is backpressure on SMTP acks, so allow more L0 read
		// amplification than pebble's default (12) before stopping writes.
		L0StopWritesThreshold: 32,
		LBaseMaxBytes:         256 << 20,
	}
	// Bloom filters make Load/Body of a message that is not in the memtable
	// cheap, and make lookups of deleted messages miss quickly.
	for i := range opts.Levels {
		opts.Levels[i].FilterPolicy = bloom.FilterPolicy(10)
	}
	return opts
}

// load counts the due entries (one per queued message) and makes sure NewID
// continues above every stored ID even if the clock went back.
func (s *Store) load() error {
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixDue}, UpperBound: []byte{prefixDue + 1}})
	if err != nil {
		return fmt.Errorf("spool: load: %w", err)
	}
	var n int64
	for ok := it.First(); ok; ok = it.Next() {
		n++
	}
	if err := firstErr(it.Error(), it.Close()); err != nil {
		return fmt.Errorf("spool: load: %w", err)
	}
	s.messages.Store(n)

	it, err = s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixMsg}, UpperBound: []byte{prefixMsg + 1}})
	if err != nil {
		return fmt.Errorf("spool: load: %w", err)
	}
	if it.Last() {
		if id, _, _, ok := parseMsgKey(it.Key()); ok {
			s.lastMicros.Store(id.micros())
		}
	}
	if err := firstErr(it.Error(), it.Close()); err != nil {
		return fmt.Errorf("spool: load: %w", err)
	}
	return nil
}

// NewID returns a new ID: the current time in microseconds, strictly
// greater than any ID this Store made or found at Open, and the node id.
func (s *Store) NewID() ID {
	now := s.clock().UnixMicro()
	for {
		last := s.lastMicros.Load()
		next := now
		if next <= last {
			next = last + 1
		}
		if s.lastMicros.CompareAndSwap(last, next) {
			return MakeID(next, s.cfg.NodeID)
		}
	}
}

// enter registers a call in progress; it returns false once Close started.
func (s *Store) enter() bool {
	if s.active.Add(1)&closingBit != 0 {
		s.exit()
		return false
	}
	return true
}

func (s *Store) exit() {
	if s.active.Add(-1) == closingBit {
		s.drainOnce.Do(func() { close(s.drained) })
	}
}

// failed returns the error of a failed store, or nil.
func (s *Store) failed() error {
	if p := s.failErr.Load(); p != nil {
		return *p
	}
	return nil
}

// fail puts the store into the failed state (the first cause sticks) and
// returns the error to report. It never blocks: pebble calls it with its
// locks held.
// Failed returns a channel closed when the store enters the failed state
// (a WAL write or sync failed, e.g. ENOSPC): from then on every write is
// refused until the store is reopened, which for a daemon means a restart.
func (s *Store) Failed() <-chan struct{} { return s.failedCh }

func (s *Store) fail(cause error) error {
	e := fmt.Errorf("%w: %w", ErrFailed, cause)
	if s.failErr.CompareAndSwap(nil, &e) {
		s.log.Error("spool failed: rejecting all writes until reopened", "err", cause)
		close(s.failedCh)
		go s.failPending(e)
	}
	return s.failed()
}

// Close stops accepting writes, waits for calls in progress and for the
// commit workers to drain the queue, then closes pebble. On a failed store
// it returns the failure; pebble may then be left open (a worker or
// pebble's Close stuck on pebble's wedged commit pipeline is abandoned
// after 5 s), holding the directory lock until the process exits.
func (s *Store) Close() error {
	err := ErrClosed
	s.closeOnce.Do(func() { err = s.close() })
	return err
}

func (s *Store) close() error {
	if s.active.Add(closingBit) == closingBit {
		s.drainOnce.Do(func() { close(s.drained) })
	}
	<-s.drained
	close(s.free.stop)
	s.lazyTimer.Stop() // pebble's Close syncs the WAL
	close(s.queue)
	workersDone := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(s.syncQ)
		s.syncWG.Wait()
		close(workersDone)
	}()
	select {
	case <-workersDone:
	case <-s.failedCh:
		select {
		case <-workersDone:
		case <-time.After(s.closeTimeout):
			s.log.Error("spool close: commit worker stuck in pebble after failure; not closing pebble")
			return s.failed()
		}
	}
	if ferr := s.failed(); ferr != nil {
		// After a panic in its commit path pebble's commit pipeline may
		// stay locked, and DB.Close waits for that lock forever.
		if s.wedged.Load() {
			s.log.Error("spool close: pebble commit pipeline wedged after failure; not closing pebble")
			return ferr
		}
		done := make(chan struct{})
		go func() { _ = s.closeDB(); close(done) }()
		select {
		case <-done:
			s.codec.close()
		case <-time.After(s.closeTimeout):
			s.log.Error("spool close: pebble close stuck after failure; abandoned")
		}
		return ferr
	}
	err := s.closeDB()
	s.codec.close()
	if err != nil {
		return fmt.Errorf("spool: close: %w", err)
	}
	s.log.Info("spool closed", "dir", s.cfg.Dir)
	return nil
}

func (s *Store) closeDB() (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("pebble close panicked: %v", r)
		}
	}()
	s.diskBytes.Store(s.db.Metrics().DiskSpaceUsage())
	return s.db.Close()
}

// Load returns the envelope and all recipient records of id, or
// ErrNotFound.
func (s *Store) Load(id ID) (*Message, error) {
	m, _, err := s.LoadWithBody(id, -1)
	return m, err
}

// LoadWithBody is Load, and also returns the decompressed body when the
// message's size (Message.Size) is at most maxBody (nil otherwise, or
// when maxBody < 0). The body is read in the same pass over the message's
// records: for mail read back from the sstables (a backlog), that saves
// Body's second walk through the levels.
func (s *Store) LoadWithBody(id ID, maxBody int64) (*Message, []byte, error) {
	if !s.enter() {
		return nil, nil, ErrClosed
	}
	defer s.exit()
	// Under the ID's lock, so that the records it reads and puts in the
	// recipient cache are not older than a concurrent Update's.
	l := s.lockID(id)
	l.Lock()
	defer l.Unlock()
	var lo, hi [rcptKeyLen]byte
	it, err := s.db.NewIter(&pebble.IterOptions{
		LowerBound: envKey(lo[:0], id),
		UpperBound: msgKey(hi[:0], id, suffixEnd),
	})
	if err != nil {
		return nil, nil, fmt.Errorf("spool: load %s: %w", id, err)
	}
	defer it.Close()
	if !it.First() || it.Key()[msgPrefixLen] != suffixEnv {
		if err := it.Error(); err != nil {
			return nil, nil, fmt.Errorf("spool: load %s: %w", id, err)
		}
		return nil, nil, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	v, err := it.ValueAndErr()
	if err != nil {
		return nil, nil, fmt.Errorf("spool: load %s: %w", id, err)
	}
	m, n, err := decodeEnvelope(v)
	if err == nil && m.ID != id {
		err = fmt.Errorf("%w: envelope of %s holds id %s", ErrCorrupt, id, m.ID)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("spool: load %s: %w", id, err)
	}
	var body []byte
	// The iterator's bounds hold only id's keys: the next one is its body.
	if maxBody >= 0 && m.Size <= maxBody && it.Next() && it.Key()[msgPrefixLen] == suffixBody {
		v, err := it.ValueAndErr()
		if err == nil {
			body, err = s.codec.decodeBody(v)
		}
		if err != nil {
			return nil, nil, fmt.Errorf("spool: body %s: %w", id, err)
		}
	}
	m.Rcpts = make([]Recipient, 0, min(n, 1024))
	m.Rcpts, err = s.scanRcpts(it, id, m.Rcpts)
	if err != nil {
		return nil, nil, err
	}
	// The Update recording this message's delivery then finds its
	// records in the cache instead of reading them back (in the drain of
	// a backlog that reached the sstables, that read was 15% of the CPU).
	// Point lookups instead of the iterator were tried for few-recipient
	// messages: no faster on a spool much larger than the block cache
	// (41 vs 36-41 µs per cold Load).
	s.rcache.put(id, slices.Clone(m.Rcpts), s.clock())
	return m, body, nil
}

// readRcpts returns the recipient records of id (empty if none).
func (s *Store) readRcpts(id ID) ([]Recipient, error) {
	var lo, hi [rcptKeyLen]byte
	it, err := s.db.NewIter(&pebble.IterOptions{
		LowerBound: msgKey(lo[:0], id, suffixRcpt),
		UpperBound: msgKey(hi[:0], id, suffixEnd),
	})
	if err != nil {
		return nil, fmt.Errorf("spool: read %s: %w", id, err)
	}
	defer it.Close()
	return s.scanRcpts(it, id, nil)
}

// scanRcpts seeks it to id's recipient records and decodes them.
func (s *Store) scanRcpts(it *pebble.Iterator, id ID, dst []Recipient) ([]Recipient, error) {
	var k [rcptKeyLen]byte
	prefix := msgKey(k[:0], id, suffixRcpt)
	for ok := it.SeekGE(prefix); ok && bytes.HasPrefix(it.Key(), prefix); ok = it.Next() {
		v, err := it.ValueAndErr()
		if err != nil {
			return nil, fmt.Errorf("spool: read %s: %w", id, err)
		}
		r, err := decodeRecipient(v)
		if err == nil {
			if _, _, idx, ok := parseMsgKey(it.Key()); !ok || idx != r.Index {
				err = fmt.Errorf("%w: recipient key %x holds index %d", ErrCorrupt, it.Key(), r.Index)
			}
		}
		if err != nil {
			return nil, fmt.Errorf("spool: read %s: %w", id, err)
		}
		dst = append(dst, r)
	}
	if err := it.Error(); err != nil {
		return nil, fmt.Errorf("spool: read %s: %w", id, err)
	}
	return dst, nil
}

// Body returns the decompressed body of id, or ErrNotFound.
func (s *Store) Body(id ID) ([]byte, error) {
	if !s.enter() {
		return nil, ErrClosed
	}
	defer s.exit()
	var k [envKeyLen]byte
	v, closer, err := s.db.Get(bodyKey(k[:0], id))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	if err != nil {
		return nil, fmt.Errorf("spool: body %s: %w", id, err)
	}
	defer closer.Close()
	body, err := s.codec.decodeBody(v)
	if err != nil {
		return nil, fmt.Errorf("spool: body %s: %w", id, err)
	}
	return body, nil
}

// Due calls fn, in due order, for every queued message whose due time (the
// earliest NextAttempt of its pending recipients) is <= before, until fn
// returns false. It reads only the due index. fn may call other Store
// methods except Close (which would wait for Due to return); it runs on an
// iterator snapshot, so it does not see writes made after Due started.
func (s *Store) Due(before time.Time, fn func(id ID, due time.Time) bool) error {
	return s.DueAfter(time.Time{}, ID{}, before, fn)
}

// DueAfter is Due starting after the entry (after, afterID), exclusive, so
// that a scheduler can page through millions of entries: pass the last
// (due, id) it was given. A zero after and afterID start at the beginning.
func (s *Store) DueAfter(after time.Time, afterID ID, before time.Time, fn func(id ID, due time.Time) bool) error {
	return s.DueAfterHint(after, afterID, before, func(id ID, due time.Time, _ []byte) bool { return fn(id, due) })
}

// DueAfterHint is DueAfter that also passes each entry's hint: the
// distinct domains of the message's pending recipients, comma-separated,
// as of the write that set the entry (empty when unknown: entries written
// before hints existed, or too many domains). It lets a caller skip
// messages for destinations it cannot take now without loading them.
// hint is valid only during the call.
func (s *Store) DueAfterHint(after time.Time, afterID ID, before time.Time, fn func(id ID, due time.Time, hint []byte) bool) error {
	if !s.enter() {
		return ErrClosed
	}
	defer s.exit()
	// Start at the due floor: below it are only deleted entries, which an
	// iterator would have to step over one by one.
	floor, gen := s.floor.get()
	lowerKey := dueKey(make([]byte, 0, dueKeyLen), floor, ID{})
	from := !after.IsZero() || !afterID.IsZero()
	afterKey := dueKey(nil, dueNanos(after), afterID)
	if from && bytes.Compare(afterKey, lowerKey) > 0 {
		lowerKey = afterKey
	}
	upper := int64(math.MaxInt64)
	upperKey := []byte{prefixDue + 1}
	if b := dueNanos(before); b < math.MaxInt64 {
		upper = b + 1
		upperKey = dueKey(nil, upper, ID{})[:9]
	}
	if bytes.Compare(lowerKey, upperKey) >= 0 {
		return nil
	}
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: lowerKey, UpperBound: upperKey})
	if err != nil {
		return fmt.Errorf("spool: due: %w", err)
	}
	defer it.Close()
	ok := it.First()
	if !from {
		// The first live entry (or the end of the range) bounds every
		// live entry from below.
		first := upper
		if ok {
			first, _, _ = parseDueKey(it.Key())
		}
		s.floor.raise(gen, first)
	}
	if ok && from && bytes.Equal(it.Key(), afterKey) {
		ok = it.Next()
	}
	for ; ok; ok = it.Next() {
		due, id, valid := parseDueKey(it.Key())
		if !valid {
			return fmt.Errorf("%w: due key %x", ErrCorrupt, it.Key())
		}
		if !fn(id, nanosToTime(due), it.Value()) {
			return nil
		}
	}
	if err := it.Error(); err != nil {
		return fmt.Errorf("spool: due: %w", err)
	}
	return nil
}

// noDue is the due value meaning "no due entry".
const noDue = math.MaxInt64

// dueFloor is a lower bound of the due values of all live due entries, so
// that scans of the due index can skip the deleted entries below it (a
// memtable full of delivered messages holds many Set+SingleDelete pairs
// that every scan from the start would step over).
//
// Writes lower it after their batch is applied and before they are
// reported done; a scan raises it to the first entry it found only if no
// write that sets a due entry completed since the scan read the floor
// (gen). A write applied after the scan's snapshot either completes before
// the raise (gen changed: no raise) or lowers the floor after it; so the
// floor is never above a live entry once its writer has been told it is
// durable.
type dueFloor struct {
	mu    sync.Mutex
	floor int64
	gen   uint64
}

func (f *dueFloor) get() (floor int64, gen uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.floor, f.gen
}

func (f *dueFloor) lower(due int64) {
	f.mu.Lock()
	f.floor = min(f.floor, due)
	f.gen++
	f.mu.Unlock()
}

func (f *dueFloor) raise(gen uint64, due int64) {
	f.mu.Lock()
	if f.gen == gen && due > f.floor {
		f.floor = due
	}
	f.mu.Unlock()
}

// NextDue returns the earliest due time of any queued message; ok is false
// when the queue is empty (or the store closed).
func (s *Store) NextDue() (due time.Time, ok bool) {
	_ = s.Due(time.Unix(0, math.MaxInt64), func(_ ID, d time.Time) bool {
		due, ok = d, true
		return false
	})
	return due, ok
}

// Walk calls fn with every queued message (envelope and recipients, no
// body) in ID order until fn returns false. It holds one message in memory
// at a time, on an iterator snapshot taken when Walk starts. fn must not
// call Close.
func (s *Store) Walk(fn func(*Message) bool) error {
	if !s.enter() {
		return ErrClosed
	}
	defer s.exit()
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixMsg}, UpperBound: []byte{prefixMsg + 1}})
	if err != nil {
		return fmt.Errorf("spool: walk: %w", err)
	}
	defer it.Close()
	ok := it.First()
	for ok {
		id, suffix, _, valid := parseMsgKey(it.Key())
		if !valid || suffix != suffixEnv {
			// A body or recipient without envelope cannot be listed; skip
			// the orphan rather than hide every later message.
			s.log.Warn("spool walk: orphan key", "key", fmt.Sprintf("%x", it.Key()))
			ok = it.Next()
			continue
		}
		v, err := it.ValueAndErr()
		if err != nil {
			return fmt.Errorf("spool: walk %s: %w", id, err)
		}
		m, n, err := decodeEnvelope(v)
		if err != nil {
			return fmt.Errorf("spool: walk %s: %w", id, err)
		}
		m.ID = id
		if m.Rcpts, err = s.scanRcpts(it, id, make([]Recipient, 0, min(n, 1024))); err != nil {
			return err
		}
		if !fn(m) {
			return nil
		}
		ok = it.Valid()
	}
	if err := it.Error(); err != nil {
		return fmt.Errorf("spool: walk: %w", err)
	}
	return nil
}

// lockID returns the mutex serializing read-modify-write calls on id.
func (s *Store) lockID(id ID) *sync.Mutex {
	return &s.idLocks[idHash(id)%idLockStripes]
}

// idHash spreads IDs (time-ordered) over lock stripes and cache shards.
func idHash(id ID) uint32 {
	return binary.BigEndian.Uint32(id[4:8]) ^ uint32(binary.BigEndian.Uint16(id[8:]))*0x9e3779b1
}

func firstErr(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}
