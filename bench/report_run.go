package bench

import (
	"fmt"
	"io"
	"text/tabwriter"
	"time"
)

// rateUnit is "msg/s" when each message has one recipient, else
// "rcpt/s" (delivery rates count pairs).
func (r Report) rateUnit() string {
	if r.Rcpts > 1 {
		return "rcpt/s"
	}
	return "msg/s"
}

func fmtLatency(l Latency) string {
	if l.Count == 0 {
		return "-"
	}
	d := func(x time.Duration) string { return fmtDur(x) }
	return fmt.Sprintf("p50 %s  p90 %s  p99 %s  max %s  (n=%d)", d(l.P50), d(l.P90), d(l.P99), d(l.Max), l.Count)
}

// fmtDur formats a duration with three significant digits or so.
func fmtDur(d time.Duration) string {
	switch {
	case d == 0:
		return "0"
	case d < time.Millisecond:
		return fmt.Sprintf("%.0fµs", float64(d)/1e3)
	case d < 10*time.Millisecond:
		return fmt.Sprintf("%.2fms", float64(d)/1e6)
	case d < time.Second:
		return fmt.Sprintf("%.0fms", float64(d)/1e6)
	case d < time.Minute:
		return fmt.Sprintf("%.2fs", d.Seconds())
	default:
		return d.Round(time.Second).String()
	}
}

func fmtMicros(d time.Duration) string {
	return fmt.Sprintf("%.0f µs", float64(d)/1e3)
}

// WriteText writes r as a readable table.
func (r Report) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	row := func(k, format string, args ...any) { fmt.Fprintf(tw, "%s\t%s\n", k, fmt.Sprintf(format, args...)) }
	row("scenario", "%s", r.Scenario)
	if r.Description != "" {
		row("", "%s", r.Description)
	}
	row("target", "%s  (run %s, %s)", r.Target, r.RunTag, r.Start.UTC().Format("2006-01-02 15:04:05 UTC"))
	row("machine", "%s: %d CPUs %s, %s, kernel %s, %s", r.Host.Hostname, r.Host.CPUs, r.Host.CPUModel,
		fmtBytes(float64(r.Host.MemTotal)), r.Host.Kernel, r.Host.Go)
	mode := "closed loop"
	if r.OpenLoop {
		mode = fmt.Sprintf("open loop at %g msg/s", r.Rate)
	}
	row("load", "%d messages max, %d sessions, %d rcpt/msg, size %s, %s", r.Messages, r.Sessions, r.Rcpts, r.Size,
		mode)
	a := r.Accounting
	status := "complete"
	if !r.Complete {
		status = "INCOMPLETE"
	}
	row("outcome", "%s: %d of %d accepted pairs delivered; lost %d, duplicates %d, corrupted %d", status,
		a.Delivered, a.Expected, a.Lost, a.Duplicates, r.Sink.Corrupted)
	if r.QueuedAtEnd > 0 {
		row("", "%d messages still queued in the target at the end", r.QueuedAtEnd)
	}
	if a.Excluded > 0 {
		row("", "%d pairs to undeliverable domains not waited for", a.Excluded)
	}
	l := r.Load
	if l.TLSConnections > 0 || r.Sink.TLS > 0 {
		row("TLS", "load→target %d of %d connections; target→sink %d of %d connections", l.TLSConnections,
			l.Connections, r.Sink.TLS, r.Sink.Connections)
	}
	row("injection", "%.0f msg/s accepted  (%d accepted of %d attempted: %d rejected, %d tempfailed, %d failed; %s)",
		r.InjectionRate, l.Accepted, l.Attempted, l.Rejected, l.TempFailed, l.Failed, fmtDur(l.Elapsed))
	row("delivery", "%.0f %s end to end  (last delivery %s after the start of the load)", r.DeliveryRate,
		r.rateUnit(), fmtDur(r.DeliverySpan))
	if r.Released > 0 {
		row("drain", "%.0f %s after the release at %s", r.DrainRate, r.rateUnit(), fmtDur(r.Released))
	}
	row("e2e latency", "%s", fmtLatency(r.E2E))
	row("accept latency", "%s", fmtLatency(r.Accept))
	if r.Load.Sojourn.Count > 0 {
		row("sojourn", "%s", fmtLatency(r.Load.Sojourn))
	}
	if r.MeasuredProcess {
		row("target CPU", "%s per message  (%.2f s in all)", fmtMicros(r.CPUPerMsg), r.TargetCPU.Seconds())
		row("target memory", "%s peak RSS", fmtBytes(float64(r.PeakRSS)))
		row("disk writes", "%s per message", fmtBytes(r.DiskWritePerMsg))
	} else {
		row("target CPU", "not measured")
	}
	if r.MeasuredSpool {
		row("fsyncs", "%.3f per message  (%d WAL syncs)", r.FsyncsPerMsg, r.Fsyncs)
		per := ""
		if r.SpoolBytesPerMsg > 0 {
			per = " (" + fmtBytes(r.SpoolBytesPerMsg) + " per queued message then)"
		}
		row("spool", "peak %s on disk; queue peak %d messages%s", fmtBytes(float64(r.SpoolPeakBytes)), r.QueuePeak, per)
	}
	row("harness CPU", "%s per message  (%.2f s: load generator, sink, DNS)", fmtMicros(r.HarnessCPUPerMsg),
		r.HarnessCPU.Seconds())
	row("machine load", "%.0f%% of %d CPUs busy; other processes %.2f s CPU; %.3f disk flushes per message",
		100*r.MachineBusy, r.Host.CPUs, r.OtherCPU.Seconds(), r.DiskFlushesPerMsg)
	if r.BusyBefore > 0 {
		row("", "%.0f%% busy just before the run", 100*r.BusyBefore)
	}
	for _, n := range r.Notes {
		row("note", "%s", n)
	}
	for _, p := range r.Problems() {
		row("PROBLEM", "%s", p)
	}
	return tw.Flush()
}
