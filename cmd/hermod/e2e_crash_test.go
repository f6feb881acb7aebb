package main

import (
	"context"
	"fmt"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/bench"
)

// TestE2ECrashUnderLoad kills the daemon with SIGKILL while it accepts and
// delivers a stream of messages, restarts it on the same spool and checks
// that every acknowledged (message, recipient) pair reaches the sink:
// nothing lost, nothing corrupted; duplicates (deliveries in flight at the
// kill) are counted and reported.
func TestE2ECrashUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	port := freePortOn(t, "127.0.0.2")
	dnsSrv, err := bench.NewDNS(bench.DNSConfig{Listen: "127.0.0.1:0", Domains: 20, MX: []string{"127.0.0.2"}, TTL: 60})
	if err != nil {
		t.Fatal(err)
	}
	defer dnsSrv.Close()
	// The sink is a little slow to answer the end of data, so that
	// deliveries are in flight when the daemon dies.
	sink, err := bench.NewSink(bench.SinkConfig{
		Listen: []string{fmt.Sprintf("127.0.0.2:%d", port)},
		Faults: bench.Faults{Default: bench.FaultRule{DataDelay: mustDelay(t, "2ms")}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()

	dir := t.TempDir()
	d := writeConfig(t, dir, "max_connections_per_ip = 200", fastDelivery(dnsSrv.Addr(), port)+
		fmt.Sprintf("pipeline_transactions = %d\n", crashPipeline))
	d.start()

	ledger := bench.NewLedger()
	var accepted atomic.Int64
	killed := make(chan struct{})
	load, err := bench.NewLoad(bench.LoadConfig{
		Targets:  []string{d.smtp},
		Sessions: 20,
		Messages: 4000,
		Duration: 8 * time.Second,
		Domains:  20,
		Rcpts:    2,
		Timeout:  5 * time.Second,
		Seed:     7,
		OnAccepted: func(id string, rcpts []string) {
			ledger.Record(id, rcpts)
			if accepted.Add(1) == 1500 {
				close(killed)
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	loadDone := make(chan bench.LoadResult, 1)
	go func() {
		res, _ := load.Run(context.Background())
		loadDone <- res
	}()
	select {
	case <-killed:
	case <-time.After(60 * time.Second):
		t.Fatalf("load never reached 1500 accepted messages (%d)", accepted.Load())
	}
	openAtKill := sink.Stats().Active
	d.kill(syscall.SIGKILL)
	atKill := sink.Stats()
	res := <-loadDone // the load stops on its own: sessions fail fast against the dead daemon
	msgs, pairs := ledger.Len()
	t.Logf("load: %d messages accepted (%d pairs) before the kill; sink had %d messages and %d connections then; load result %+v",
		msgs, pairs, atKill.Messages, openAtKill, res.Accepted)

	d.start()
	deadline := time.Now().Add(60 * time.Second)
	var acct bench.Accounting
	for {
		acct = ledger.Check(sink.Count)
		if acct.Lost == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	st := sink.Stats()
	t.Logf("after restart: %+v; sink: messages=%d duplicates=%d corrupted=%d", acct, st.Messages, st.Duplicates, st.Corrupted)
	if acct.Lost != 0 {
		t.Fatalf("%d acknowledged recipient deliveries lost after kill -9", acct.Lost)
	}
	if st.Corrupted != 0 {
		t.Fatalf("%d corrupted messages", st.Corrupted)
	}
	// Duplicates are allowed (at least once) but bounded by what was in
	// flight: a connection's batch is recorded after its last reply, so
	// at most the connections open at the kill times the transactions of
	// a batch times the recipients per message — far below the load.
	if bound := max(openAtKill, 1) * crashPipeline * 2; acct.Duplicates > uint64(bound) {
		t.Errorf("%d duplicate deliveries: more than in flight at the kill (%d connections × %d transactions × 2 recipients = %d)",
			acct.Duplicates, openAtKill, crashPipeline, bound)
	}
	fmt.Printf("crash test: accepted %d messages / %d pairs before SIGKILL, lost %d, duplicates %d\n", msgs, pairs, acct.Lost, acct.Duplicates)
}

// crashPipeline is the crash test's pipeline_transactions: the most
// transactions a connection has in flight, which bounds the duplicates.
const crashPipeline = 4

func mustDelay(t *testing.T, s string) bench.DelayDist {
	t.Helper()
	var d bench.DelayDist
	if err := d.UnmarshalText([]byte(s)); err != nil {
		t.Fatal(err)
	}
	return d
}
