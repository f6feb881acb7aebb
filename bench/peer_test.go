package bench

import (
	"bytes"
	"os/exec"
	"strings"
	"testing"
)

func TestTransportMap(t *testing.T) {
	got := string(transportMap(map[string]string{"d0002.test": "127.0.0.3", "d0001.test": "127.0.0.2"}, 2600))
	want := "d0001.test\trelay:[127.0.0.2]:2600\nd0002.test\trelay:[127.0.0.3]:2600\n"
	if !strings.HasPrefix(got, "#") || !strings.HasSuffix(got, want) {
		t.Errorf("got %q", got)
	}
}

func TestPostfixScript(t *testing.T) {
	s := PostfixScript()
	if !bytes.HasPrefix(s, []byte("#!/usr/bin/env bash")) {
		t.Fatal("not a bash script")
	}
	for _, want := range []string{"Local only", "DEBIAN_FRONTEND=noninteractive", "transport_maps = hash:$TABLE",
		"postsuper -d ALL", "postqueue -f"} {
		if !bytes.Contains(s, []byte(want)) {
			t.Errorf("script lacks %q", want)
		}
	}
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("no bash")
	}
	cmd := exec.Command(bash, "-n")
	cmd.Stdin = bytes.NewReader(s)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("bash -n: %v\n%s", err, out)
	}
	// Unknown subcommands fail without touching anything.
	cmd = exec.Command(bash, "-s", "frobnicate")
	cmd.Stdin = bytes.NewReader(s)
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "usage") {
		t.Errorf("unknown subcommand: %v\n%s", err, out)
	}
}
