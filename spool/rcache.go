package spool

import (
	"sync"
	"sync/atomic"
	"time"
)

// rcptCache remembers the recipient records of messages this process
// committed, so that the Update recording their delivery (usually a few
// milliseconds later) need not read them back from pebble: without it,
// every Update opens an iterator and seeks through the memtables, a large
// share of the spool's CPU per relayed message.
//
// It is a read cache only: pebble stays the record. An entry is exactly the
// recipient records pebble holds for its ID, because every write of
// recipient records goes through encodeCommit (which inserts the entry) or
// modify (which takes it out under the ID's lock and puts back the new
// state only after its write succeeded). An entry is inserted before its
// commit is durable and marked durable when the commit is; modify ignores
// (and drops) an entry not yet durable, since the commit may still fail.
//
// Bounded: at most rcacheMax entries (beyond that, messages are simply not
// cached), and a message whose pending recipients are all deferred beyond
// rcacheHorizon is dropped, so that a backlog of deferred mail does not
// fill it.
type rcptCache struct {
	n      atomic.Int64
	shards [rcacheShards]rcacheShard
}

const (
	rcacheShards  = 64
	rcacheMax     = 1 << 16
	rcacheHorizon = 10 * time.Second
)

type rcacheShard struct {
	mu sync.Mutex
	m  map[ID]*rcacheEntry
}

// rcacheEntry is one cached message's recipient records.
type rcacheEntry struct {
	rcpts   []Recipient
	durable bool
	one     [1]Recipient // backs rcpts for a single recipient
}

func (c *rcptCache) shard(id ID) *rcacheShard {
	return &c.shards[idHash(id)%rcacheShards]
}

// add caches a copy of rcpts, not yet durable, and returns the entry (nil
// when the cache is full).
func (c *rcptCache) add(id ID, rcpts []Recipient) *rcacheEntry {
	if c.n.Load() >= rcacheMax {
		return nil
	}
	e := &rcacheEntry{}
	if len(rcpts) == 1 {
		e.one[0] = rcpts[0]
		e.rcpts = e.one[:]
	} else {
		e.rcpts = append([]Recipient(nil), rcpts...)
	}
	sh := c.shard(id)
	sh.mu.Lock()
	if sh.m == nil {
		sh.m = make(map[ID]*rcacheEntry)
	}
	if _, ok := sh.m[id]; !ok {
		c.n.Add(1)
	}
	sh.m[id] = e
	sh.mu.Unlock()
	return e
}

// settle marks e durable when its commit succeeded, or drops it.
func (c *rcptCache) settle(id ID, e *rcacheEntry, ok bool) {
	sh := c.shard(id)
	sh.mu.Lock()
	if sh.m[id] == e {
		if ok {
			e.durable = true
		} else {
			delete(sh.m, id)
			c.n.Add(-1)
		}
	}
	sh.mu.Unlock()
}

// take removes id's entry and returns its records when they are durable;
// nil otherwise. The caller owns the returned slice.
func (c *rcptCache) take(id ID) []Recipient {
	sh := c.shard(id)
	sh.mu.Lock()
	e, ok := sh.m[id]
	if ok {
		delete(sh.m, id)
		c.n.Add(-1)
	}
	sh.mu.Unlock()
	if !ok || !e.durable {
		return nil
	}
	return e.rcpts
}

// put caches rcpts, the durable records of id, unless the cache is full
// or no pending recipient is due within rcacheHorizon of now.
func (c *rcptCache) put(id ID, rcpts []Recipient, now time.Time) {
	soon := false
	limit := now.Add(rcacheHorizon)
	for i := range rcpts {
		if rcpts[i].State == Pending && !rcpts[i].NextAttempt.After(limit) {
			soon = true
			break
		}
	}
	if !soon || c.n.Load() >= rcacheMax {
		return
	}
	e := &rcacheEntry{rcpts: rcpts, durable: true}
	sh := c.shard(id)
	sh.mu.Lock()
	if sh.m == nil {
		sh.m = make(map[ID]*rcacheEntry)
	}
	if _, ok := sh.m[id]; !ok {
		c.n.Add(1)
	}
	sh.m[id] = e
	sh.mu.Unlock()
}
