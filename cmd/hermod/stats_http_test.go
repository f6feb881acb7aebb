package main

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/engine"
)

// statsHTTPNow is the fake clock of these tests, 30 s into a minute.
var statsHTTPNow = time.Date(2030, 5, 6, 7, 8, 30, 0, time.UTC)

func statsHTTPRecorder() *engine.DomainStats {
	s := engine.NewDomainStats(engine.DomainStatsOptions{})
	add := func(domain, ev string, n int, age time.Duration, delay float64) {
		for range n {
			s.Observe(&engine.DeliveryRecord{Time: statsHTTPNow.Add(-age), Event: ev, Domain: domain, Delay: delay})
		}
	}
	add("gmail.test", "delivered", 10, 5*time.Minute, 0.3)
	add("gmail.test", "deferred", 2, 5*time.Minute, 0)
	add("yahoo.test", "delivered", 3, 30*time.Minute, 20)
	add("yahoo.test", "bounced", 1, 30*time.Minute, 0)
	add("old.test", "expired", 4, 2*time.Hour, 0)
	return s
}

func TestStatsDomainsHandler(t *testing.T) {
	srv := httptest.NewServer(statsDomainsHandler(statsHTTPRecorder(), func() time.Time { return statsHTTPNow }))
	defer srv.Close()
	type row struct {
		domain                         string
		delivered, deferred, b, expire uint64
	}
	for _, tc := range []struct {
		query  string
		code   int
		rows   []row
		total  row
		window time.Duration // from Since to Until
	}{
		{"", 200, []row{{"gmail.test", 10, 2, 0, 0}, {"yahoo.test", 3, 0, 1, 0}}, row{"", 13, 2, 1, 0}, 60*time.Minute + 30*time.Second},
		{"minutes=10", 200, []row{{"gmail.test", 10, 2, 0, 0}}, row{"", 10, 2, 0, 0}, 10*time.Minute + 30*time.Second},
		{"hours=3", 200, []row{{"gmail.test", 10, 2, 0, 0}, {"old.test", 0, 0, 0, 4}, {"yahoo.test", 3, 0, 1, 0}}, row{"", 13, 2, 1, 4}, 3*time.Hour + 30*time.Second},
		{"hours=3&top=1", 200, []row{{"gmail.test", 10, 2, 0, 0}}, row{"", 13, 2, 1, 4}, 3*time.Hour + 30*time.Second},
		{"domain=YAHOO.test", 200, []row{{"yahoo.test", 3, 0, 1, 0}}, row{"", 13, 2, 1, 0}, 60*time.Minute + 30*time.Second},
		{"domain=none.test", 200, []row{}, row{"", 13, 2, 1, 0}, 60*time.Minute + 30*time.Second},
		{"minutes=abc", 400, nil, row{}, 0},
		{"minutes=0", 400, nil, row{}, 0},
		{"minutes=-5", 400, nil, row{}, 0},
		{"minutes=5&hours=1", 400, nil, row{}, 0},
		{"top=x", 400, nil, row{}, 0},
	} {
		t.Run(tc.query, func(t *testing.T) {
			resp, err := http.Get(srv.URL + "/api/stats/domains?" + tc.query)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != tc.code {
				t.Fatalf("status %d, want %d", resp.StatusCode, tc.code)
			}
			if tc.code != 200 {
				return
			}
			if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("content type %q", ct)
			}
			var rep engine.Report
			if err := json.NewDecoder(resp.Body).Decode(&rep); err != nil {
				t.Fatal(err)
			}
			rows := []row{}
			for _, d := range rep.Domains {
				rows = append(rows, row{d.Domain, d.Delivered, d.Deferred, d.Bounced, d.Expired})
			}
			if !reflect.DeepEqual(rows, tc.rows) {
				t.Errorf("rows %v, want %v", rows, tc.rows)
			}
			if tot := rep.Total; (row{"", tot.Delivered, tot.Deferred, tot.Bounced, tot.Expired}) != tc.total {
				t.Errorf("total %+v, want %v", tot, tc.total)
			}
			if w := rep.Until.Sub(rep.Since); w != tc.window || !rep.Until.Equal(statsHTTPNow) {
				t.Errorf("window %v … %v (%v), want %v up to %v", rep.Since, rep.Until, w, tc.window, statsHTTPNow)
			}
		})
	}
	resp, err := http.Post(srv.URL+"/api/stats/domains", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST: status %d", resp.StatusCode)
	}
}

func TestCmdStats(t *testing.T) {
	mux := http.NewServeMux()
	mux.Handle("GET /api/stats/domains", statsDomainsHandler(statsHTTPRecorder(), func() time.Time { return statsHTTPNow }))
	srv := httptest.NewServer(mux)
	defer srv.Close()
	admin := strings.TrimPrefix(srv.URL, "http://")

	var out bytes.Buffer
	if err := runStats([]string{"-admin", admin, "-hours", "3"}, &out); err != nil {
		t.Fatal(err)
	}
	t.Logf("hermod stats -hours 3:\n%s", out.String())
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 6 {
		t.Fatalf("want window, header, 3 domains, total; got\n%s", out.String())
	}
	for i, want := range [][]string{
		{"DOMAIN", "DELIVERED", "DEFERRED", "BOUNCED", "EXPIRED", "P50", "P90", "P99"},
		{"gmail.test", "10", "2", "0", "0"}, // latencies checked below
		{"old.test", "0", "0", "0", "4", "-", "-", "-"},
		{"yahoo.test", "3", "0", "1", "0"},
		{"TOTAL", "(all", "domains)", "13", "2", "1", "4"},
	} {
		f := strings.Fields(lines[i+1])
		if len(f) < len(want) || !reflect.DeepEqual(f[:len(want)], want) {
			t.Errorf("line %d: %q, want it to start with %q", i+1, lines[i+1], want)
		}
	}
	// 0.3 s lies in [2^8, 2^8.5) ms; 20 s in [2^14, 2^14.5) ms.
	if f := strings.Fields(lines[2]); len(f) != 8 || !strings.HasSuffix(f[5], "ms") {
		t.Errorf("gmail.test latencies: %q", lines[2])
	}
	if f := strings.Fields(lines[4]); len(f) != 8 || !strings.HasSuffix(f[5], "s") || strings.HasSuffix(f[5], "ms") {
		t.Errorf("yahoo.test latencies: %q", lines[4])
	}

	out.Reset()
	if err := runStats([]string{"-http", admin, "-domain", "gmail.test", "-json"}, &out); err != nil {
		t.Fatal(err)
	}
	var rep engine.Report
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatalf("%v in\n%s", err, out.String())
	}
	if len(rep.Domains) != 1 || rep.Domains[0].Delivered != 10 || rep.Total.Bounced != 1 {
		t.Errorf("JSON %+v", rep)
	}

	for _, args := range [][]string{
		{"-admin", admin, "-minutes", "5", "-hours", "1"}, // refused by the daemon
		{"-admin", admin, "extra"},
		{"-admin", "127.0.0.1:1"}, // nothing listens on port 1
	} {
		out.Reset()
		if err := runStats(args, &out); err == nil {
			t.Errorf("%q: no error", args)
		}
	}
}

func TestFormatLatency(t *testing.T) {
	for _, tc := range []struct {
		sec  float64
		want string
	}{
		{0.0004, "0.4ms"}, {0.25, "250ms"}, {1.5, "1.5s"}, {42, "42s"}, {90, "1.5m"},
		{7200, "2.0h"}, {3 * 86400, "3.0d"}, {-1, "?"},
	} {
		if got := formatLatency(tc.sec); got != tc.want {
			t.Errorf("formatLatency(%v) = %q, want %q", tc.sec, got, tc.want)
		}
	}
}
