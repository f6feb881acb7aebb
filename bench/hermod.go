package bench

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/BurntSushi/toml"
)

// ErrNoHermod is returned by FindHermod when no hermod binary is found.
var ErrNoHermod = errors.New("bench: no hermod binary (build it with `make build`, or pass its path)")

// FindHermod returns the hermod binary a run uses by default: ./bin/hermod
// when it exists, else "hermod" next to the running executable, else the
// first "hermod" on $PATH.
func FindHermod() (string, error) {
	isExe := func(p string) bool {
		fi, err := os.Stat(p)
		return err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0
	}
	if p := filepath.Join("bin", "hermod"); isExe(p) {
		return filepath.Abs(p)
	}
	if exe, err := os.Executable(); err == nil {
		if p := filepath.Join(filepath.Dir(exe), "hermod"); isExe(p) {
			return p, nil
		}
	}
	if p, err := exec.LookPath("hermod"); err == nil {
		return filepath.Abs(p)
	}
	return "", ErrNoHermod
}

// HermodTarget runs the hermod binary on a generated configuration in the
// run's work directory: SMTP and HTTP on free loopback ports, the spool on
// disk (fsynced before every 250, as always), the resolver pointed at the
// test DNS and the delivery port at the sink's. Everything else is
// Hermod's default, then the scenario's [hermod] table, then Config.
//
// It measures the process's CPU time and peak RSS from /proc and the
// spool's WAL fsyncs and size from /metrics.
type HermodTarget struct {
	// Binary is the hermod executable. Default: FindHermod().
	Binary string
	// Config holds configuration keys merged last (tables as nested maps,
	// e.g. {"spool": {"commit_workers": 8}}). Default: none.
	Config map[string]any
	// LogLevel is Hermod's [log] level. Default: "warn".
	LogLevel string
	// StartTimeout bounds the wait for /healthz. Default: 30s.
	StartTimeout time.Duration

	cmd     *exec.Cmd
	exited  chan struct{}
	logPath string
	http    string
	smtp    string
}

// Name returns "hermod".
func (h *HermodTarget) Name() string { return "hermod" }

// freePort returns a port that was free on ip a moment ago.
func freePort(ip string) (int, error) {
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// hermodConfig returns the generated configuration (as TOML tables).
func (h *HermodTarget) hermodConfig(env TargetEnv, smtp, httpAddr string) map[string]any {
	level := h.LogLevel
	if level == "" {
		level = "warn"
	}
	delivery := map[string]any{"port": env.SinkPort}
	if env.CAFile != "" {
		delivery["tls_ca_file"] = env.CAFile
	}
	cfg := map[string]any{
		"server": map[string]any{"hostname": "hermod.bench.test"},
		"smtp": map[string]any{
			"listen":                 []string{smtp},
			"max_connections_per_ip": max(50, 2*env.Scenario.Load.Sessions),
		},
		"spool":    map[string]any{"dir": filepath.Join(env.WorkDir, "spool")},
		"dns":      map[string]any{"resolvers": []string{env.DNS}},
		"delivery": delivery,
		"http":     map[string]any{"listen": httpAddr},
		"log": map[string]any{
			"level":        level,
			"delivery_log": filepath.Join(env.WorkDir, "delivery.log"),
		},
	}
	if env.Scenario.Load.StartTLS {
		smtp := cfg["smtp"].(map[string]any)
		smtp["tls_cert"] = filepath.Join(env.WorkDir, "smtpd-cert.pem")
		smtp["tls_key"] = filepath.Join(env.WorkDir, "smtpd-key.pem")
	}
	mergeTables(cfg, env.Scenario.Hermod)
	mergeTables(cfg, h.Config)
	return cfg
}

// mergeTables merges src into dst: tables are merged key by key, anything
// else replaces.
func mergeTables(dst, src map[string]any) {
	for k, v := range src {
		if sv, ok := v.(map[string]any); ok {
			if dv, ok := dst[k].(map[string]any); ok {
				mergeTables(dv, sv)
				continue
			}
			cp := map[string]any{}
			mergeTables(cp, sv)
			dst[k] = cp
			continue
		}
		dst[k] = v
	}
}

// Start writes the configuration, starts hermod and waits for /healthz.
func (h *HermodTarget) Start(ctx context.Context, env TargetEnv) ([]string, error) {
	bin := h.Binary
	if bin == "" {
		var err error
		if bin, err = FindHermod(); err != nil {
			return nil, err
		}
	}
	if strings.ContainsRune(bin, filepath.Separator) {
		// The process runs in the work directory: a relative path would
		// be taken from there.
		abs, err := filepath.Abs(bin)
		if err != nil {
			return nil, err
		}
		bin = abs
	}
	sp, err := freePort("127.0.0.1")
	if err != nil {
		return nil, err
	}
	hp, err := freePort("127.0.0.1")
	if err != nil {
		return nil, err
	}
	h.smtp = net.JoinHostPort("127.0.0.1", strconv.Itoa(sp))
	h.http = net.JoinHostPort("127.0.0.1", strconv.Itoa(hp))
	if env.Scenario.Load.StartTLS {
		// The load asks for STARTTLS: give hermod a certificate to offer.
		if err := writeSelfSigned(filepath.Join(env.WorkDir, "smtpd-cert.pem"),
			filepath.Join(env.WorkDir, "smtpd-key.pem"), "hermod.bench.test", "127.0.0.1"); err != nil {
			return nil, err
		}
	}
	var buf bytes.Buffer
	buf.WriteString("# Generated by hermod-bench for scenario " + env.Scenario.Name + ".\n")
	if err := toml.NewEncoder(&buf).Encode(h.hermodConfig(env, h.smtp, h.http)); err != nil {
		return nil, fmt.Errorf("bench: hermod config: %w", err)
	}
	cfgPath := filepath.Join(env.WorkDir, "hermod.toml")
	if err := os.WriteFile(cfgPath, buf.Bytes(), 0o600); err != nil {
		return nil, err
	}
	h.logPath = filepath.Join(env.WorkDir, "hermod.log")
	logf, err := os.Create(h.logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child has its own descriptor
	h.cmd = exec.Command(bin, "serve", "-config", cfgPath)
	h.cmd.Dir = env.WorkDir
	h.cmd.Stdout, h.cmd.Stderr = logf, logf
	if err := h.cmd.Start(); err != nil {
		h.cmd = nil
		return nil, fmt.Errorf("bench: start %s: %w", bin, err)
	}
	h.exited = make(chan struct{})
	go func(c *exec.Cmd, done chan struct{}) {
		_ = c.Wait()
		close(done)
	}(h.cmd, h.exited)
	timeout := h.StartTimeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if err := waitHealthy(wctx, "http://"+h.http+"/healthz", h.exited); err != nil {
		return nil, fmt.Errorf("%w\n%s", err, h.logTail())
	}
	env.note("hermod: pid %d, smtp %s, http %s, work dir %s", h.cmd.Process.Pid, h.smtp, h.http, env.WorkDir)
	return []string{h.smtp}, nil
}

// writeSelfSigned writes a fresh self-signed certificate for name and ip
// and its key as PEM files.
func writeSelfSigned(certFile, keyFile, name, ip string) error {
	cert, certPEM, err := selfSigned([]string{name, "localhost"}, []net.IP{net.ParseIP(ip)})
	if err != nil {
		return err
	}
	keyPEM, err := pemKey(cert.PrivateKey)
	if err != nil {
		return err
	}
	if err := os.WriteFile(certFile, certPEM, 0o644); err != nil {
		return err
	}
	return os.WriteFile(keyFile, keyPEM, 0o600)
}

// logTail returns the end of hermod's log, for errors.
func (h *HermodTarget) logTail() string {
	b, err := os.ReadFile(h.logPath)
	if err != nil {
		return ""
	}
	if len(b) > 4096 {
		b = b[len(b)-4096:]
	}
	return "hermod log (end):\n" + string(b)
}

// Probe reads /proc/PID and /metrics.
func (h *HermodTarget) Probe(ctx context.Context) Probe {
	var p Probe
	if h.cmd == nil || h.cmd.Process == nil {
		return p
	}
	select {
	case <-h.exited:
		return p
	default:
	}
	probeProcess(&p, h.cmd.Process.Pid)
	scrapeHermod(ctx, &p, "http://"+h.http+"/metrics")
	return p
}

// Released does nothing: Hermod retries on its own schedule (the backlog
// scenario shortens it).
func (h *HermodTarget) Released(context.Context) error { return nil }

// Stop sends SIGTERM and waits up to 30 s for hermod to exit, then kills
// it. It returns an error when hermod had already exited.
func (h *HermodTarget) Stop() error {
	if h.cmd == nil || h.cmd.Process == nil {
		return nil
	}
	defer func() { h.cmd = nil }()
	select {
	case <-h.exited:
		return fmt.Errorf("%w before the end of the run: %v\n%s", ErrTargetExited, h.cmd.ProcessState, h.logTail())
	default:
	}
	_ = h.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-h.exited:
		return nil
	case <-time.After(30 * time.Second):
		_ = h.cmd.Process.Kill()
		<-h.exited
		return fmt.Errorf("bench: hermod did not stop within 30s of SIGTERM (killed)")
	}
}

// scrapeHermod reads Hermod's Prometheus text at url into p's spool
// figures. Failures leave p unchanged.
func scrapeHermod(ctx context.Context, p *Probe, url string) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return
	}
	parseHermodMetrics(resp.Body, p)
}

// parseHermodMetrics picks the spool figures out of Prometheus text.
func parseHermodMetrics(r io.Reader, p *Probe) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		name, val, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		if i := strings.IndexByte(val, ' '); i >= 0 {
			val = val[:i] // a timestamp follows
		}
		v, err := strconv.ParseFloat(val, 64)
		if err != nil {
			continue
		}
		switch name {
		case `hermod_spool_fsyncs_total{file="wal"}`:
			p.Fsyncs, p.Spool = uint64(v), true
		case "hermod_spool_disk_bytes":
			p.SpoolBytes, p.Spool = uint64(v), true
		case "hermod_spool_messages":
			p.Queued, p.Queue = int64(v), true
		}
	}
}
