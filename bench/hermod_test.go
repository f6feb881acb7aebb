package bench

import (
	"bytes"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"
)

func TestHermodConfig(t *testing.T) {
	sc := testScenario(t, smallScenario+`
[hermod.delivery]
tls = "required"
retry = ["2s", "5s"]
[hermod.spool]
compression = "none"
`)
	h := &HermodTarget{Config: map[string]any{"spool": map[string]any{"commit_workers": 8}, "log": map[string]any{
		"level": "debug"}}}
	env := TargetEnv{Scenario: sc, DNS: "127.0.0.1:5300", SinkPort: 2600, CAFile: "/x/ca.pem", WorkDir: "/w"}
	var buf bytes.Buffer
	if err := toml.NewEncoder(&buf).Encode(h.hermodConfig(env, "127.0.0.1:1", "127.0.0.1:2")); err != nil {
		t.Fatal(err)
	}
	// Decode it back as hermod would see it.
	var got struct {
		SMTP struct {
			Listen   []string `toml:"listen"`
			MaxPerIP int      `toml:"max_connections_per_ip"`
		} `toml:"smtp"`
		Spool struct {
			Dir         string `toml:"dir"`
			Compression string `toml:"compression"`
			Workers     int    `toml:"commit_workers"`
		} `toml:"spool"`
		DNS struct {
			Resolvers []string `toml:"resolvers"`
		} `toml:"dns"`
		Delivery struct {
			Port  int      `toml:"port"`
			TLS   string   `toml:"tls"`
			CA    string   `toml:"tls_ca_file"`
			Retry []string `toml:"retry"`
		} `toml:"delivery"`
		HTTP struct {
			Listen string `toml:"listen"`
		} `toml:"http"`
		Log struct {
			Level       string `toml:"level"`
			DeliveryLog string `toml:"delivery_log"`
		} `toml:"log"`
	}
	if _, err := toml.Decode(buf.String(), &got); err != nil {
		t.Fatalf("%v\n%s", err, buf.String())
	}
	if got.SMTP.Listen[0] != "127.0.0.1:1" || got.SMTP.MaxPerIP != 50 || got.Spool.Dir != "/w/spool" ||
		got.Spool.Compression != "none" || got.Spool.Workers != 8 || got.DNS.Resolvers[0] != "127.0.0.1:5300" ||
		got.Delivery.Port != 2600 || got.Delivery.TLS != "required" || got.Delivery.CA != "/x/ca.pem" ||
		strings.Join(got.Delivery.Retry, ",") != "2s,5s" || got.HTTP.Listen != "127.0.0.1:2" ||
		got.Log.Level != "debug" || got.Log.DeliveryLog != "/w/delivery.log" {
		t.Errorf("config:\n%s\nparsed %+v", buf.String(), got)
	}
	// The scenario's table is not modified by the merge.
	if _, ok := sc.Hermod["log"]; ok {
		t.Error("merge wrote into the scenario")
	}
}

func TestParseHermodMetrics(t *testing.T) {
	text := `# HELP hermod_spool_fsyncs_total File syncs.
# TYPE hermod_spool_fsyncs_total counter
hermod_spool_fsyncs_total{file="other"} 12
hermod_spool_fsyncs_total{file="wal"} 3575
hermod_spool_disk_bytes 2.7787264e+07
hermod_spool_messages 42 1700000000000
hermod_smtp_messages_received_total 5
`
	var p Probe
	parseHermodMetrics(strings.NewReader(text), &p)
	if !p.Spool || p.Fsyncs != 3575 || p.SpoolBytes != 27787264 || !p.Queue || p.Queued != 42 {
		t.Errorf("%+v", p)
	}
	var none Probe
	parseHermodMetrics(strings.NewReader("garbage\nx y z\n"), &none)
	if none.Spool || none.Queue {
		t.Errorf("%+v", none)
	}
}

func TestMergeTables(t *testing.T) {
	dst := map[string]any{"a": map[string]any{"x": 1, "y": 2}, "b": 1}
	src := map[string]any{"a": map[string]any{"y": 3, "z": map[string]any{"k": 1}}, "b": map[string]any{"t": 1}}
	mergeTables(dst, src)
	a := dst["a"].(map[string]any)
	if a["x"] != 1 || a["y"] != 3 || a["z"].(map[string]any)["k"] != 1 || dst["b"].(map[string]any)["t"] != 1 {
		t.Errorf("%v", dst)
	}
	// dst does not share src's tables.
	a["z"].(map[string]any)["k"] = 2
	if src["a"].(map[string]any)["z"].(map[string]any)["k"] != 1 {
		t.Error("merge aliases the source")
	}
}
