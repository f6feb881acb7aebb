package netio

import (
	"bufio"
	"bytes"
	"context"
	"net"
	"net/netip"
	"testing"
	"time"
)

// clientSink starts a fast SMTP sink on 127.0.0.1: it accepts everything,
// answers commands as they come and flushes its replies only when it has
// read all input, as a pipelining server does.
func clientSink(tb testing.TB, pipelining bool) netip.AddrPort {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ln.Close() })
	ehlo := "250-sink\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n"
	if pipelining {
		ehlo = "250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n"
	}
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go clientSinkServe(conn, ehlo)
		}
	}()
	return netip.MustParseAddrPort(ln.Addr().String())
}

func clientSinkServe(conn net.Conn, ehlo string) {
	defer conn.Close()
	// Bounds the loops below: the sink serves one benchmark run at most.
	conn.SetDeadline(time.Now().Add(5 * time.Minute))
	r := bufio.NewReaderSize(conn, 64<<10)
	w := bufio.NewWriterSize(conn, 4<<10)
	w.WriteString("220 sink ESMTP\r\n")
	w.Flush()
	for {
		line, err := r.ReadSlice('\n')
		if err != nil || len(line) < 4 {
			return
		}
		var verb [4]byte
		for i := range verb {
			verb[i] = line[i] &^ 0x20 // upper case for letters
		}
		switch string(verb[:]) {
		case "EHLO":
			w.WriteString(ehlo)
		case "DATA":
			w.WriteString("354 go\r\n")
			w.Flush()
			for {
				l, err := r.ReadSlice('\n')
				if err == bufio.ErrBufferFull {
					continue
				}
				if err != nil {
					return
				}
				if string(l) == ".\r\n" {
					break
				}
			}
			w.WriteString("250 2.0.0 queued\r\n")
		case "QUIT":
			w.WriteString("221 2.0.0 bye\r\n")
			w.Flush()
			return
		default:
			w.WriteString("250 2.0.0 ok\r\n")
		}
		if r.Buffered() == 0 {
			if w.Flush() != nil {
				return
			}
		}
	}
}

func clientBenchSend(b *testing.B, pipelining, agent bool) {
	addr := clientSink(b, pipelining)
	cfg := clientTestConfig()
	ctx := context.Background()
	if agent {
		var cancel context.CancelFunc
		ctx, cancel = context.WithCancel(ctx)
		defer cancel()
	}
	c, err := Dial(ctx, cfg, "sink.test", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Quit()
	body := bytes.Repeat([]byte("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!\r\n"), 16) // 1 KiB
	env := &ClientEnvelope{From: "bench@x.test", Rcpts: []string{"rcpt@y.test"}}
	b.ReportAllocs()
	b.SetBytes(int64(len(body)))
	for b.Loop() {
		if agent {
			c.ResetNext()
		}
		res, err := c.Send(ctx, env, body)
		if err != nil {
			b.Fatal(err)
		}
		if res.Data == nil || res.Data.Code != 250 {
			b.Fatalf("DATA: %v", res.Data)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
}

// BenchmarkSendPipelined sends 1 KiB messages to one recipient over one
// reused connection to a pipelining sink.
func BenchmarkSendPipelined(b *testing.B) { clientBenchSend(b, true, false) }

// BenchmarkSendPipelinedAgent is BenchmarkSendPipelined as the scheduler's
// agents call Send: with a cancellable context and RSET before each
// transaction.
func BenchmarkSendPipelinedAgent(b *testing.B) { clientBenchSend(b, true, true) }

// BenchmarkClientSendLockStep is the same without PIPELINING.
func BenchmarkClientSendLockStep(b *testing.B) { clientBenchSend(b, false, false) }

func BenchmarkClientWriteBody(b *testing.B) {
	body := bytes.Repeat([]byte("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!\r\n.dot\r\n"), 1000)
	w := bufio.NewWriterSize(clientDiscard{}, clientWriteBuf)
	b.ReportAllocs()
	b.SetBytes(int64(len(body)))
	for b.Loop() {
		clientWriteBody(w, body)
	}
}

type clientDiscard struct{}

func (clientDiscard) Write(p []byte) (int, error) { return len(p), nil }
