package engine

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hermod-mta/hermod/dnscache"
	"github.com/hermod-mta/hermod/internal/smtperr"
	"github.com/hermod-mta/hermod/netio"
	"github.com/hermod-mta/hermod/spool"
)

// attemptResult is what an agent tells the loop about a finished job.
type attemptResult struct {
	delivered, deferred, bounced int
	destFail                     bool   // no MX could be reached (or DNS failed temporarily)
	lastReply                    string // for the destination's status
	// requeue: the job was not attempted — the destination refused one
	// more connection while others to it were working (a per-client
	// connection cap, as large providers have). Nothing was written; the
	// job goes back to the front of the queue and the destination's
	// concurrency is lowered.
	requeue bool
}

var (
	errNullMX = smtperr.New(556, "5.1.10", "recipient domain publishes a null MX (RFC 7505): it accepts no mail")
	errNoMX   = smtperr.New(451, "4.4.1", "no mail exchanger could be reached")
)

// runAgent is one outbound connection: it delivers batches of jobs to its
// destination until the loop answers nil.
func (s *Scheduler) runAgent(a *agent, jobs []*job) {
	defer s.agentWG.Done()
	for jobs != nil {
		res := s.attempt(a, jobs)
		a.usable = a.conn != nil && a.conn.Usable()
		s.events <- evDone{a: a, jobs: jobs, res: res}
		jobs = <-a.next
	}
	if a.conn != nil {
		_ = a.conn.Quit()
		a.conn = nil
	}
	s.events <- evAgentExit{a}
}

// delivery is what one attempt learned, for the logs.
type delivery struct {
	mx, ip          string
	tls             bool
	dsn             bool // the server offered DSN: NOTIFY went on with the mail
	queue, dns, con time.Duration
	xmit            time.Duration
}

// attempt runs the transactions of jobs (all to a.d) over one connection,
// connecting first when needed, pipelined when the server allows, and
// writes every recipient's outcome to the spool before returning (durable
// for bounces; see recordWith).
func (s *Scheduler) attempt(a *agent, jobs []*job) []*attemptResult {
	start := s.now()
	results := make([]*attemptResult, len(jobs))
	var dvBuf [4]delivery // batches are mostly of one job: no allocation
	dvs := dvBuf[:0]
	if len(jobs) <= len(dvBuf) {
		dvs = dvBuf[:len(jobs)]
	} else {
		dvs = make([]delivery, len(jobs))
	}
	envs := make([]*netio.ClientEnvelope, 0, len(jobs))
	bodies := make([][]byte, 0, len(jobs))
	live := make([]int, 0, len(jobs)) // indexes of jobs to send
	for k, j := range jobs {
		msg := j.e.msg
		dvs[k].queue = max(0, start.Sub(j.ready))
		if j.ready.IsZero() {
			dvs[k].queue = 0
		}
		j.e.mu.Lock()
		body := j.e.body
		j.e.mu.Unlock()
		var err error
		if body == nil {
			body, err = s.st.Body(msg.ID)
		}
		if err != nil {
			if errors.Is(err, spool.ErrNotFound) {
				// Removed meanwhile (admin delete): nothing to do.
				results[k] = &attemptResult{}
				continue
			}
			results[k] = s.record(j, a, allSame(len(j.rcpts), outDeferred, smtperr.New(451, "4.3.0", "local error reading the queued message: %v", err)), false, &dvs[k])
			continue
		}
		box := &envBox{env: netio.ClientEnvelope{From: msg.From, Size: int64(len(body)), Body8Bit: msg.Body8Bit, SMTPUTF8: msg.SMTPUTF8, EnvID: msg.EnvID, Ret: msg.Ret}}
		env := &box.env
		if len(j.rcpts) == 1 {
			box.one[0] = msg.Rcpts[j.rcpts[0]].Addr
			env.Rcpts = box.one[:]
		} else {
			env.Rcpts = make([]string, 0, len(j.rcpts))
			for _, i := range j.rcpts {
				env.Rcpts = append(env.Rcpts, msg.Rcpts[i].Addr)
			}
		}
		for n, i := range j.rcpts {
			if p := dsnRcptParams(&msg.Rcpts[i]); p != "" {
				if env.RcptParams == nil {
					env.RcptParams = make([]string, len(j.rcpts))
				}
				env.RcptParams[n] = p
			}
		}
		envs = append(envs, env)
		bodies = append(bodies, body)
		live = append(live, k)
	}
	if len(live) == 0 {
		return results
	}
	for try := 0; ; try++ {
		if a.conn != nil && !a.conn.Usable() {
			_ = a.conn.Close()
			a.conn = nil
		}
		reused := a.conn != nil
		var dv delivery
		if reused {
			// RSET goes out pipelined with the next MAIL.
			a.conn.ResetNext()
			dv.mx = a.mx
			dv.ip = a.conn.RemoteIP()
			_, _, _, dv.tls = a.conn.TLSInfo()
		} else {
			reply, destFail, perm := s.connect(a, jobs[live[0]], &dv)
			if a.conn == nil && destFail && a.d.limiting(s.now(), a.refused) && s.ctx.Err() == nil {
				for _, k := range live {
					results[k] = &attemptResult{requeue: true, lastReply: reply.Error()}
				}
				return results
			}
			if a.conn == nil {
				class := outDeferred
				if perm {
					class = outBounced
				}
				for _, k := range live {
					dvs[k].dns, dvs[k].con = dv.dns, dv.con
					results[k] = s.record(jobs[k], a, allSame(len(jobs[k].rcpts), class, reply), destFail, &dvs[k])
				}
				return results
			}
		}
		dv.dsn = a.conn.DSN()
		t0 := s.now()
		srs, errs := a.conn.SendBatch(s.ctx, envs, bodies)
		xmit := s.now().Sub(t0)
		if !a.conn.Usable() {
			_ = a.conn.Close()
			a.conn = nil
			// No transaction got a reply (a message refused before
			// sending has no result): the server had closed the cached
			// connection before these transactions began, not the
			// messages' fault; try again on a new connection. Once one
			// got a reply, messages may have been delivered: they must
			// not be sent again.
			stale := true
			for _, sr := range srs {
				if sr != nil && sr.Mail != nil {
					stale = false
				}
			}
			if reused && try == 0 && stale && s.ctx.Err() == nil {
				s.m.staleConns.Add(1)
				continue
			}
		}
		// Each record waits until its spool write is done (durable, for a
		// bounce). The records of a batch run at once, so that their
		// writes share one group commit instead of waiting for one each in
		// turn: all
		// but the last on goroutines, with the random draws made here in
		// the order sequential records would make them. (A batch of one,
		// the usual case, allocates nothing for this.)
		var pend []pendingRecord
		for n, k := range live {
			a.sent++
			j := jobs[k]
			dvs[k].mx, dvs[k].ip, dvs[k].tls, dvs[k].dsn = dv.mx, dv.ip, dv.tls, dv.dsn
			dvs[k].dns, dvs[k].con, dvs[k].xmit = dv.dns, dv.con, xmit
			outs := make([]rcptOutcome, len(j.rcpts))
			for r := range j.rcpts {
				var reply *smtperr.Error
				if sr := srs[n]; sr != nil && len(sr.Rcpts) == len(j.rcpts) {
					reply = sr.Outcome(r)
				}
				outs[r].class, outs[r].reply = classify(reply, errs[n])
				if rep := outs[r].reply; outs[r].class == outBounced && rep.Code == 552 && rep.Enhanced == "5.5.3" {
					// RFC 821's "too many recipients": temporary
					// (RFC 5321 §4.5.3.1.10; RFC 3463 X.5.3: the rest
					// are delivered later). Without 5.5.3 a 552 is
					// "exceeded storage allocation" and stays permanent.
					outs[r].class = outDeferred
				}
			}
			moreAtOnce(outs)
			if n < len(live)-1 {
				draws := make(drawList, len(j.rcpts))
				for r := range draws {
					draws[r] = a.rand.Float64()
				}
				pend = append(pend, pendingRecord{k: k, j: j, outs: slices.Clone(outs), dv: dvs[k], draws: draws})
				continue
			}
			var wg *sync.WaitGroup
			if len(pend) > 0 {
				wg = s.recordOn(pend, results)
			}
			results[k] = s.record(j, a, outs, false, &dvs[k])
			if wg != nil {
				wg.Wait()
			}
		}
		return results
	}
}

// moreAtOnce marks the recipients of one transaction that were deferred
// for their number (enhanced code X.5.3: the server's recipient limit)
// while others were delivered: they go again at once in a new transaction
// (RFC 5321 §4.5.3.1.10), each one making progress, instead of waiting
// for a backoff. When none was delivered they back off as usual.
func moreAtOnce(outs []rcptOutcome) {
	delivered := false
	for _, o := range outs {
		delivered = delivered || o.class == outDelivered
	}
	if !delivered {
		return
	}
	for i, o := range outs {
		if o.class == outDeferred && o.reply != nil && (o.reply.Enhanced == "4.5.3" || o.reply.Enhanced == "5.5.3") {
			outs[i].class = outMore
		}
	}
}

// pendingRecord is a record of a batch to run on its own goroutine.
type pendingRecord struct {
	k     int // index of the job (and its result)
	j     *job
	outs  []rcptOutcome
	dv    delivery
	draws drawList
}

// recordOn runs the records of recs on goroutines, each storing its result
// in results; the returned group is done when they all are.
func (s *Scheduler) recordOn(recs []pendingRecord, results []*attemptResult) *sync.WaitGroup {
	var wg sync.WaitGroup
	for i := range recs {
		r := &recs[i]
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[r.k] = s.recordWith(r.j, &r.draws, r.outs, false, &r.dv)
		}()
	}
	return &wg
}

// jitterSource gives the random numbers of the retry jitter: the agent's
// *rand.Rand, or a drawList.
type jitterSource interface{ Float64() float64 }

// drawList yields numbers drawn beforehand, in order.
type drawList []float64

// Float64 returns the next number.
func (d *drawList) Float64() float64 {
	v := (*d)[0]
	*d = (*d)[1:]
	return v
}

// envBox holds an envelope and, for the usual single recipient, its
// recipient list: one allocation instead of two.
type envBox struct {
	env netio.ClientEnvelope
	one [1]string
}

type rcptOutcome struct {
	class outcomeClass
	reply *smtperr.Error
}

func allSame(n int, class outcomeClass, reply *smtperr.Error) []rcptOutcome {
	outs := make([]rcptOutcome, n)
	for i := range outs {
		outs[i] = rcptOutcome{class, reply}
	}
	return outs
}

// connect resolves the destination and dials its MX hosts in preference
// order (each address of a host, then the next host) until one answers.
// With no connection it returns the reply to record, whether the whole
// destination failed, and whether the failure is permanent.
func (s *Scheduler) connect(a *agent, j *job, dv *delivery) (*smtperr.Error, bool, bool) {
	domain := j.d.name
	t0 := s.now()
	route, err := s.opt.Resolver.Resolve(s.ctx, domain)
	dv.dns = s.now().Sub(t0)
	if err != nil {
		if dnscache.IsPermanent(err) {
			return smtperr.Classify(err), false, true
		}
		return smtperr.Classify(err), true, false
	}
	if route.NullMX {
		return errNullMX, false, true
	}
	t1 := s.now()
	defer func() { dv.con = s.now().Sub(t1) }()
	var last *smtperr.Error
	for _, h := range route.Hosts {
		if h.Err != nil {
			last = smtperr.New(451, "4.4.3", "%s: %v", h.Name, h.Err)
			continue
		}
		for _, ip := range h.Addrs {
			if s.ctx.Err() != nil {
				return smtperr.New(451, "4.3.2", "delivery interrupted by shutdown"), false, false
			}
			addr := netip.AddrPortFrom(ip, uint16(s.cfg.Port))
			c, err := netio.Dial(s.ctx, &s.cfg.ClientConfig, h.Name, addr)
			if err != nil && s.cfg.TLS == netio.TLSOpportunistic && errors.Is(err, netio.ErrClientTLSHandshake) && s.ctx.Err() == nil {
				// Opportunistic TLS gives way to an MX whose TLS does not
				// interoperate: the mail goes in clear on a new connection
				// rather than waiting for a handshake that keeps failing
				// (Postfix's TLS_README, "may" level).
				s.log.Warn("TLS handshake failed, delivering without TLS", "mx", h.Name, "ip", ip.String(), "err", err)
				s.m.tlsFallbacks.Add(1)
				plain := s.cfg.ClientConfig
				plain.TLS = netio.TLSDisabled
				c, err = netio.Dial(s.ctx, &plain, h.Name, addr)
			}
			if err != nil {
				last = smtperr.Classify(err)
				if last.Code == 451 && last.Enhanced == "4.3.0" {
					last = smtperr.New(451, "4.4.1", "%s[%s]: %v", h.Name, ip, err)
					a.refused = false
				} else {
					last = smtperr.New(last.Code, last.Enhanced, "%s[%s] said: %s", h.Name, ip, last.Message)
					a.refused = last.Temporary()
				}
				continue
			}
			a.conn, a.mx, a.sent = c, h.Name, 0
			dv.mx, dv.ip = h.Name, c.RemoteIP()
			_, _, _, dv.tls = c.TLSInfo()
			return nil, false, false
		}
	}
	if last == nil {
		last = errNoMX
	}
	// Whatever the hosts said, failing to open any session is temporary
	// for the destination (RFC 5321 §5.1: try the other hosts, then later).
	if last.Permanent() {
		last = smtperr.New(451, "4.4.1", "all mail exchangers refused service: %s", last.Message)
	}
	return last, true, false
}

// record writes the outcome of every recipient of j to the spool (bounce
// first, then the recipient records), then logs it. It draws the retry
// jitter from a's random source.
func (s *Scheduler) record(j *job, a *agent, outs []rcptOutcome, destFail bool, dv *delivery) *attemptResult {
	return s.recordWith(j, a.rand, outs, destFail, dv)
}

// recordWith is record with the jitter drawn from rnd, once per recipient
// in order. It is safe to run for several jobs at once.
func (s *Scheduler) recordWith(j *job, rnd jitterSource, outs []rcptOutcome, destFail bool, dv *delivery) *attemptResult {
	now := s.now()
	msg := j.e.msg
	res := &attemptResult{destFail: destFail}
	updates := make([]spool.Recipient, len(j.rcpts))
	events := make([]string, len(j.rcpts))
	var failed, relayed, delayed []int
	// Jobs of one message to several domains finish concurrently: one at a
	// time updates the message.
	j.e.mu.Lock()
	defer j.e.mu.Unlock()
	var lastReply *smtperr.Error
	var lastText string
	for k, i := range j.rcpts {
		r := msg.Rcpts[i]
		reply := outs[k].reply
		if reply != lastReply || k == 0 {
			// Recipients of a transaction mostly share one reply: format
			// it once.
			lastReply, lastText = reply, reply.Error()
		}
		nr, class, expired := transition(&s.cfg, msg, r, outs[k].class, lastText, now, rnd.Float64())
		updates[k] = nr
		msg.Rcpts[i] = nr
		switch {
		case class == outDelivered:
			res.delivered++
			events[k] = "delivered"
			if r.Notify&spool.NotifySuccess != 0 && !dv.dsn {
				// The next hop took no NOTIFY: we report the success
				// ourselves, as "relayed" (RFC 3461 §6.2.2).
				relayed = append(relayed, k)
			}
		case expired:
			res.bounced++
			events[k] = "expired"
			failed = append(failed, k)
		case class == outBounced:
			res.bounced++
			events[k] = "bounced"
			failed = append(failed, k)
		case class == outMore:
			// Sent again at once for the server's recipient limit: not a
			// deferral (Postfix logs nothing); the log says "resent".
			events[k] = "resent"
		default:
			res.deferred++
			events[k] = "deferred"
			if s.warnDelay(msg, &r, now) {
				delayed = append(delayed, k)
			}
		}
		res.lastReply = lastText
	}
	// Deliveries and deferrals do not wait for their fsync: lost in a
	// crash, they are only tried again (the next synced write, or the
	// spool's lazy_sync_delay, makes them durable). A bounce waits: its
	// notification must not be sent twice.
	update := s.st.UpdateLazy
	if len(failed) > 0 || len(relayed) > 0 || len(delayed) > 0 {
		s.notifySender(msg, updates, failed, relayed, delayed, dv, now)
		update = s.st.Update
	}
	if removed, err := update(msg.ID, updates); err != nil {
		// The outcome is not written: the recipients stay pending in the
		// spool and will be tried again (at least once, never lost).
		s.log.Error("recording delivery outcome", "msg_id", msg.ID.String(), "err", err)
	} else if s.opt.Recorded != nil {
		s.opt.Recorded(msg, updates, removed)
	}
	for k, i := range j.rcpts {
		r := updates[k]
		s.m.outcome(events[k])
		if events[k] == "delivered" {
			s.m.latency.Observe(now.Sub(msg.Received).Seconds())
		}
		if s.opt.Log != nil || s.opt.Observe != nil {
			rec := DeliveryRecord{
				Time: now.UTC(), Event: events[k], MsgID: msg.ID.String(), Rcpt: msg.Rcpts[i].Addr, Domain: j.d.name,
				MX: dv.mx, IP: dv.ip, Reply: r.LastReply, TLS: dv.tls, Attempt: r.Attempts,
				NextAttempt: nextAttempt(r), Delay: now.Sub(msg.Received).Seconds(),
				Delays: FormatDelays(dv.queue, dv.dns, dv.con, dv.xmit),
			}
			s.observe(&rec)
		}
	}
	return res
}

// observe hands a delivery record to the log and the observer.
func (s *Scheduler) observe(rec *DeliveryRecord) {
	if s.opt.Log != nil {
		s.opt.Log.Delivery(*rec)
	}
	if s.opt.Observe != nil {
		s.opt.Observe(rec)
	}
}

func nextAttempt(r spool.Recipient) time.Time {
	if r.State == spool.Pending {
		return r.NextAttempt.UTC()
	}
	return time.Time{}
}

// suspendJob defers a job's recipients of a backed-off destination.
func (s *Scheduler) suspendJob(j *job, now, until time.Time, reason string) {
	msg := j.e.msg
	j.e.mu.Lock()
	defer j.e.mu.Unlock()
	updates := make([]spool.Recipient, len(j.rcpts))
	var expired []int
	for k, i := range j.rcpts {
		nr, exp := suspend(&s.cfg, msg, msg.Rcpts[i], now, until, reason)
		updates[k] = nr
		msg.Rcpts[i] = nr
		if exp {
			expired = append(expired, k)
		}
	}
	update := s.st.UpdateLazy // as in recordWith
	if len(expired) > 0 {
		s.notifySender(msg, updates, expired, nil, nil, &delivery{}, now)
		update = s.st.Update
	}
	if removed, err := update(msg.ID, updates); err != nil {
		s.log.Error("recording suspension", "msg_id", msg.ID.String(), "err", err)
	} else if s.opt.Recorded != nil {
		s.opt.Recorded(msg, updates, removed)
	}
	for k, i := range j.rcpts {
		ev := "deferred"
		if updates[k].State == spool.Expired {
			ev = "expired"
		}
		s.m.outcome(ev)
		if s.opt.Log != nil || s.opt.Observe != nil {
			s.observe(&DeliveryRecord{Time: now.UTC(), Event: ev, MsgID: msg.ID.String(), Rcpt: msg.Rcpts[i].Addr,
				Domain: j.d.name, Reply: reason, Attempt: updates[k].Attempts, NextAttempt: nextAttempt(updates[k]),
				Delay: now.Sub(msg.Received).Seconds()})
		}
	}
}

// notifySender commits a delivery status notification to the message's
// sender for the failed recipients, those relayed to a next hop without
// DSN and those delayed past DeliveryConfig.DelayWarning (indexes into
// updates), unless the sender is null, the message is
// itself a notification, or no recipient's NOTIFY asks for one (BuildDSN
// decides). It is committed before the recipients' new states, so that a
// crash can repeat a notification but never lose one; when it cannot be
// committed the failed recipients stay pending (they fail again later).
func (s *Scheduler) notifySender(msg *spool.Message, updates []spool.Recipient, failed, relayed, delayed []int, dv *delivery, now time.Time) {
	if msg.From == "" || msg.Bounce {
		return
	}
	if len(failed) == 0 && len(delayed) == 0 && !anyWants(updates, relayed) {
		return
	}
	body, err := s.st.Body(msg.ID)
	if err != nil {
		s.log.Error("reading message for bounce", "msg_id", msg.ID.String(), "err", err)
		body = nil
	}
	var rcpts []DSNRecipient
	for _, k := range failed {
		rcpt := DSNRecipientFor(&updates[k], DSNFailed) // Status derived from the reply
		rcpt.RemoteMTA, rcpt.LastAttempt = dv.mx, now
		rcpts = append(rcpts, rcpt)
	}
	for _, k := range relayed {
		rcpt := DSNRecipientFor(&updates[k], DSNRelayed)
		rcpt.RemoteMTA, rcpt.LastAttempt = dv.mx, now
		rcpts = append(rcpts, rcpt)
	}
	for _, k := range delayed {
		rcpt := DSNRecipientFor(&updates[k], DSNDelayed)
		rcpt.RemoteMTA, rcpt.LastAttempt = dv.mx, now
		rcpt.WillRetryUntil = msg.Received.Add(s.cfg.MaxQueueLifetime)
		rcpts = append(rcpts, rcpt)
	}
	dsn, ok, err := BuildDSN(DSNInput{ReportingMTA: s.opt.Hostname, Msg: msg, Body: body, Rcpts: rcpts, Now: now})
	if err != nil || !ok {
		if err != nil {
			s.log.Error("building bounce", "msg_id", msg.ID.String(), "err", err)
		}
		return
	}
	bm := dsn.Envelope()
	bm.Received, bm.Helo, bm.ClientIP = now, s.opt.Hostname, "127.0.0.1"
	bm.Rcpts[0].Domain, bm.Rcpts[0].NextAttempt = netio.Domain(dsn.Rcpt), now
	bm.ID = s.st.NewID()
	s.Arriving(bm.ID)
	var copied chan error
	if s.opt.Replicate != nil {
		// Bounces are copied to cluster peers like received mail.
		copied = make(chan error, 1)
		s.opt.Replicate(bm, dsn.Body, func(err error) { copied <- err })
	}
	err = s.st.CommitWait(bm, dsn.Body)
	if copied != nil {
		if cerr := <-copied; cerr != nil && err == nil {
			s.log.Warn("bounce queued without cluster copies", "msg_id", bm.ID.String(), "err", cerr)
		}
	}
	if err != nil {
		s.Abandon(bm.ID)
		s.log.Error("queueing bounce", "msg_id", msg.ID.String(), "err", err)
		// Leave the recipients pending: they will fail again and bounce
		// then. Nothing is lost, at worst a notification repeats.
		for _, k := range failed {
			updates[k].State = spool.Pending
			updates[k].NextAttempt = now.Add(s.cfg.retryDelay(1, 0.5))
		}
		return
	}
	s.m.dsns.Add(1)
	s.Enqueue(bm, dsn.Body)
}

// anyWants reports whether one of the recipients at idx asked for a
// success notification.
func anyWants(updates []spool.Recipient, idx []int) bool {
	for _, k := range idx {
		if updates[k].Notify&spool.NotifySuccess != 0 && updates[k].Notify&spool.NotifyNever == 0 {
			return true
		}
	}
	return false
}

// dsnRcptParams returns the DSN parameters of r to pass on in its RCPT
// command ("NOTIFY=... ORCPT=..."), "" when the client gave none. An
// ORCPT address with raw UTF-8 (allowed in an SMTPUTF8 transaction) goes
// on in the \x{HHHH} form of RFC 6533 §3, valid without SMTPUTF8 too.
func dsnRcptParams(r *spool.Recipient) string {
	if r.Notify == 0 && r.ORcpt == "" {
		return ""
	}
	var b strings.Builder
	if r.Notify != 0 {
		b.WriteString("NOTIFY=")
		b.WriteString(spool.FormatNotify(r.Notify))
	}
	if r.ORcpt != "" {
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		b.WriteString("ORCPT=")
		for _, c := range r.ORcpt {
			if c < 0x80 {
				b.WriteRune(c)
				continue
			}
			fmt.Fprintf(&b, "\\x{%X}", c)
		}
	}
	return b.String()
}
