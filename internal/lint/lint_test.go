// Package lint holds repository-wide checks.
package lint

import (
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/hermod-mta/hermod"

// layer gives each package's place in the one-way dependency order of
// STYLE.md; a package may import only packages of a strictly lower layer.
// bench is special: it may use only internal helpers, never the code it
// measures.
func layer(pkg string) (int, bool) {
	rel := strings.TrimPrefix(strings.TrimPrefix(pkg, module), "/")
	top, _, _ := strings.Cut(rel, "/")
	switch top {
	case "internal":
		return 0, true
	case "netio":
		return 1, true
	case "spool", "dnscache":
		return 2, true
	case "engine":
		return 3, true
	case "cluster":
		return 4, true
	case "bench":
		return 5, true
	case "cmd":
		return 6, true
	}
	return 0, false
}

func topDir(pkg string) string {
	rel := strings.TrimPrefix(strings.TrimPrefix(pkg, module), "/")
	top, _, _ := strings.Cut(rel, "/")
	if top == "cmd" {
		return rel // each command is its own part
	}
	return top
}

func TestDependencyOrder(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", `{{.ImportPath}}{{range .Imports}} {{.}}{{end}}`, module+"/...").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	checked := 0
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		pkg := f[0]
		from, ok := layer(pkg)
		if !ok {
			t.Errorf("package %s is not placed in the dependency order (add it to layer)", pkg)
			continue
		}
		for _, imp := range f[1:] {
			if !strings.HasPrefix(imp, module+"/") {
				continue
			}
			checked++
			to, _ := layer(imp)
			switch {
			case strings.HasPrefix(pkg, module+"/bench") && to != 0 && !strings.HasPrefix(imp, module+"/bench"):
				t.Errorf("%s imports %s: bench may use only internal/ packages (it measures the rest)", pkg, imp)
			case topDir(pkg) == topDir(imp):
				// Sub-packages of one part may use each other.
			case strings.Contains(pkg, "/cmd/") && to < 6:
			case to >= from:
				t.Errorf("%s (layer %d) imports %s (layer %d): imports must go down the order", pkg, from, imp, to)
			}
		}
	}
	if checked == 0 {
		t.Fatal("no internal imports found: the check is not looking at the tree")
	}
}
