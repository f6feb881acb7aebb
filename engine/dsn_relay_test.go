package engine

import (
	"bufio"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/spool"
)

// dsnSink is an SMTP server that records every transaction it accepted:
// its MAIL and RCPT lines and its content. It offers DSN when dsn is set;
// recipients starting with "reject" get 550, those starting with "defer"
// 451.
type dsnSink struct {
	dsn bool

	mu  sync.Mutex
	txs []dsnTx
}

type dsnTx struct {
	mail  string
	rcpts []string
	body  string
}

func (k *dsnSink) serve(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	r, w := bufio.NewReader(c), bufio.NewWriter(c)
	w.WriteString("220 sink ESMTP\r\n")
	var tx dsnTx
	for {
		if w.Flush() != nil {
			return
		}
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		line = strings.TrimSuffix(line, "\r\n")
		switch strings.ToUpper(line[:min(4, len(line))]) {
		case "EHLO":
			w.WriteString("250-sink\r\n")
			if k.dsn {
				w.WriteString("250-DSN\r\n")
			}
			w.WriteString("250 PIPELINING\r\n")
		case "MAIL":
			tx = dsnTx{mail: line}
			w.WriteString("250 2.1.0 ok\r\n")
		case "RSET":
			tx = dsnTx{}
			w.WriteString("250 2.0.0 ok\r\n")
		case "RCPT":
			if strings.HasPrefix(line, "RCPT TO:<reject") {
				w.WriteString("550 5.1.1 no such user\r\n")
				continue
			}
			if strings.HasPrefix(line, "RCPT TO:<defer") {
				w.WriteString("451 4.2.0 mailbox busy\r\n")
				continue
			}
			tx.rcpts = append(tx.rcpts, line)
			w.WriteString("250 2.1.5 ok\r\n")
		case "DATA":
			if len(tx.rcpts) == 0 {
				w.WriteString("554 5.5.1 no valid recipients\r\n")
				continue
			}
			w.WriteString("354 go\r\n")
			w.Flush()
			var body strings.Builder
			for {
				l, err := r.ReadString('\n')
				if err != nil {
					return
				}
				if l == ".\r\n" {
					break
				}
				body.WriteString(strings.TrimPrefix(l, "."))
			}
			tx.body = body.String()
			k.mu.Lock()
			k.txs = append(k.txs, tx)
			k.mu.Unlock()
			tx = dsnTx{}
			w.WriteString("250 2.0.0 queued\r\n")
		case "QUIT":
			w.WriteString("221 2.0.0 bye\r\n")
			w.Flush()
			return
		default:
			w.WriteString("500 5.5.2 what\r\n")
		}
	}
}

func (k *dsnSink) transactions() []dsnTx {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]dsnTx(nil), k.txs...)
}

// TestDSNParamsRelayed: a message whose recipients asked for notifications
// (RFC 3461) goes to a next hop that offers DSN with its NOTIFY, ORCPT,
// RET and ENVID, and to one that does not as plain SMTP, Hermod then
// sending the "relayed" notification that SUCCESS asked for, and a
// bounce only for the failure whose NOTIFY did not say NEVER.
func TestDSNParamsRelayed(t *testing.T) {
	for _, offers := range []bool{true, false} {
		name := "next hop without DSN"
		if offers {
			name = "next hop with DSN"
		}
		t.Run(name, func(t *testing.T) {
			sink := &dsnSink{dsn: offers}
			addr := serveLoopback(t, sink.serve)
			st := openStore(t)
			s := testScheduler(t, st, addr, nil)
			now := time.Now()
			msg := &spool.Message{
				ID: st.NewID(), From: "s@src.test", Received: now, ClientIP: "127.0.0.1", Helo: "src.test",
				EnvID: "env 1+", Ret: "HDRS",
				Rcpts: []spool.Recipient{
					{Addr: "ok@dest.test", Notify: spool.NotifySuccess | spool.NotifyFailure, ORcpt: "rfc822;list+2Bok@src.test"},
					{Addr: "quiet@dest.test", Notify: spool.NotifyNever},
					{Addr: "reject-never@dest.test", Notify: spool.NotifyNever},
					{Addr: "reject-default@dest.test"},
				},
			}
			for i := range msg.Rcpts {
				msg.Rcpts[i].Index, msg.Rcpts[i].Domain, msg.Rcpts[i].NextAttempt = uint16(i), "dest.test", now
			}
			body := []byte("Subject: asked\r\nMessage-ID: <asked@src.test>\r\n\r\nbody\r\n")
			deliverOne(t, s, st, msg, body)

			// The original, then the notification to s@src.test (same
			// sink: every domain resolves to it).
			var txs []dsnTx
			deadline := time.Now().Add(20 * time.Second)
			for {
				txs = sink.transactions()
				if len(txs) >= 2 && st.Stats().Messages == 0 || time.Now().After(deadline) {
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
			time.Sleep(100 * time.Millisecond) // nothing more may come
			txs = sink.transactions()
			if len(txs) != 2 {
				t.Fatalf("sink got %d transactions, want the original and one notification: %+v", len(txs), txs)
			}
			orig, dsn := txs[0], txs[1]
			if offers {
				if orig.mail != "MAIL FROM:<s@src.test> RET=HDRS ENVID=env+201+2B" {
					t.Errorf("MAIL line %q", orig.mail)
				}
				want := []string{
					"RCPT TO:<ok@dest.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;list+2Bok@src.test",
					"RCPT TO:<quiet@dest.test> NOTIFY=NEVER",
				}
				if strings.Join(orig.rcpts, "|") != strings.Join(want, "|") {
					t.Errorf("RCPT lines %q, want %q", orig.rcpts, want)
				}
			} else {
				if orig.mail != "MAIL FROM:<s@src.test>" || strings.Join(orig.rcpts, "|") != "RCPT TO:<ok@dest.test>|RCPT TO:<quiet@dest.test>" {
					t.Errorf("plain SMTP expected: %q %q", orig.mail, orig.rcpts)
				}
			}
			if dsn.mail != "MAIL FROM:<>" || len(dsn.rcpts) != 1 || dsn.rcpts[0] != "RCPT TO:<s@src.test>" {
				t.Fatalf("notification envelope %q %q", dsn.mail, dsn.rcpts)
			}
			report := dsn.body
			for _, want := range []string{"Final-Recipient: rfc822; reject-default@dest.test", "Original-Envelope-Id: env 1+", "Action: failed"} {
				if !strings.Contains(report, want) {
					t.Errorf("notification lacks %q:\n%s", want, report)
				}
			}
			if strings.Contains(report, "reject-never@") || strings.Contains(report, "quiet@") {
				t.Errorf("notification reports a NOTIFY=NEVER recipient:\n%s", report)
			}
			relayed := strings.Contains(report, "Action: relayed") && strings.Contains(report, "Original-Recipient: rfc822; list+ok@src.test")
			if offers == relayed {
				t.Errorf("next hop offers DSN: %v; \"relayed\" reported for ok@dest.test: %v\n%s", offers, relayed, report)
			}
			if !strings.Contains(report, "Content-Type: text/rfc822-headers") || strings.Contains(report, "\r\n\r\nbody\r\n") {
				t.Errorf("RET=HDRS: the notification must return the header section only:\n%s", report)
			}
		})
	}
}

// TestDelayWarning: with delivery.delay_warning, a message deferred past
// it makes its sender get one "delayed" notification for the recipients
// whose NOTIFY allows it, at the first failed attempt after the delay,
// and no other at the next attempts.
func TestDelayWarning(t *testing.T) {
	sink := &dsnSink{}
	addr := serveLoopback(t, sink.serve)
	st := openStore(t)
	s := testScheduler(t, st, addr, func(c *DeliveryConfig) {
		c.DelayWarning = time.Hour
		c.Retry = []time.Duration{50 * time.Millisecond}
		c.Jitter = 0
	})
	now := time.Now()
	msg := &spool.Message{
		ID: st.NewID(), From: "s@src.test", Received: now.Add(-2 * time.Hour), ClientIP: "127.0.0.1", Helo: "src.test",
		Rcpts: []spool.Recipient{
			{Addr: "defer-default@dest.test"},
			{Addr: "defer-delay@dest.test", Notify: spool.NotifyDelay | spool.NotifyFailure},
			{Addr: "defer-failure-only@dest.test", Notify: spool.NotifyFailure},
			{Addr: "defer-never@dest.test", Notify: spool.NotifyNever},
		},
	}
	for i := range msg.Rcpts {
		msg.Rcpts[i].Index, msg.Rcpts[i].Domain, msg.Rcpts[i].NextAttempt = uint16(i), "dest.test", now
	}
	body := []byte("Subject: slow\r\n\r\nbody\r\n")
	deliverOne(t, s, st, msg, body)

	// Several attempts (retries every 50 ms); only the first warns.
	deadline := time.Now().Add(10 * time.Second)
	for {
		m, err := st.Load(msg.ID)
		if err != nil {
			t.Fatal(err)
		}
		if m.Rcpts[0].Attempts >= 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 10 s: %d attempts", m.Rcpts[0].Attempts)
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	var warnings []dsnTx
	for _, tx := range sink.transactions() {
		if tx.mail == "MAIL FROM:<>" {
			warnings = append(warnings, tx)
		}
	}
	if len(warnings) != 1 {
		t.Fatalf("%d notifications to the sender, want one warning", len(warnings))
	}
	w := warnings[0].body
	for _, want := range []string{"Action: delayed", "Final-Recipient: rfc822; defer-default@dest.test",
		"Final-Recipient: rfc822; defer-delay@dest.test", "Will-Retry-Until: ", "Diagnostic-Code: smtp; 451 4.2.0 mailbox busy"} {
		if !strings.Contains(w, want) {
			t.Errorf("warning lacks %q:\n%s", want, w)
		}
	}
	if strings.Contains(w, "failure-only@") || strings.Contains(w, "never@") {
		t.Errorf("warning reports a recipient whose NOTIFY excludes delays:\n%s", w)
	}
	if m, _ := st.Load(msg.ID); m == nil || m.Rcpts[0].State != spool.Pending {
		t.Errorf("the warned recipients must stay queued: %+v", m)
	}
}

func TestDelayWarningConfig(t *testing.T) {
	for _, tt := range []struct {
		warn time.Duration
		ok   bool
	}{{0, true}, {4 * time.Hour, true}, {-time.Second, false}, {120 * time.Hour, false}, {200 * time.Hour, false}} {
		c := DeliveryConfig{DelayWarning: tt.warn}
		c.EnsureDefaults()
		err := c.Validate()
		if (err == nil) != tt.ok || err != nil && !strings.Contains(err.Error(), "delay_warning") {
			t.Errorf("delay_warning %v: %v", tt.warn, err)
		}
	}
}
