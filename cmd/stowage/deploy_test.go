package main

import (
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"go.yaml.in/yaml/v3"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/orphans"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// The monitoring files shipped in deploy/ (see docs/operations.md, "Health
// and metrics").
const (
	dashboardFile = "../../deploy/grafana/stowage-dashboard.json"
	alertsFile    = "../../deploy/prometheus/stowage-alerts.yml"
)

type grafanaRef struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type grafanaPanel struct {
	ID         int         `json:"id"`
	Type       string      `json:"type"`
	Title      string      `json:"title"`
	Datasource *grafanaRef `json:"datasource"`
	GridPos    *struct {
		H, W, X, Y *int
	} `json:"gridPos"`
	Targets []struct {
		RefID      string      `json:"refId"`
		Expr       string      `json:"expr"`
		Datasource *grafanaRef `json:"datasource"`
	} `json:"targets"`
	Panels []grafanaPanel `json:"panels"`
}

type grafanaDashboard struct {
	Inputs []struct {
		Name     string `json:"name"`
		Type     string `json:"type"`
		PluginID string `json:"pluginId"`
	} `json:"__inputs"`
	Title         string         `json:"title"`
	UID           string         `json:"uid"`
	SchemaVersion int            `json:"schemaVersion"`
	Panels        []grafanaPanel `json:"panels"`
}

func loadDashboard(t *testing.T) grafanaDashboard {
	t.Helper()
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	var d grafanaDashboard
	if err := dec.Decode(&d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	return d
}

// dashboardExprs are the PromQL expressions of every panel, by panel title.
func dashboardExprs(d grafanaDashboard) map[string][]string {
	out := map[string][]string{}
	var walk func([]grafanaPanel)
	walk = func(ps []grafanaPanel) {
		for _, p := range ps {
			for _, tg := range p.Targets {
				out["panel "+p.Title] = append(out["panel "+p.Title], tg.Expr)
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	return out
}

// alertExprs are the expressions of every rule in the alert rules file, by
// alert name.
func alertExprs(t *testing.T) map[string][]string {
	t.Helper()
	b, err := os.ReadFile(alertsFile)
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		Groups []struct {
			Rules []struct {
				Alert       string            `yaml:"alert"`
				Expr        string            `yaml:"expr"`
				Annotations map[string]string `yaml:"annotations"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	if err := yaml.Unmarshal(b, &f); err != nil {
		t.Fatalf("%s: %v", alertsFile, err)
	}
	out := map[string][]string{}
	for _, g := range f.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" || r.Expr == "" {
				t.Errorf("%s: a rule without alert name or expr: %+v", alertsFile, r)
			}
			for _, a := range []string{"summary", "description", "runbook_url"} {
				if r.Annotations[a] == "" {
					t.Errorf("%s: %s: no %s annotation", alertsFile, r.Alert, a)
				}
			}
			out["alert "+r.Alert] = append(out["alert "+r.Alert], r.Expr)
		}
	}
	if len(out) == 0 {
		t.Fatalf("%s: no alerts", alertsFile)
	}
	return out
}

// TestGrafanaDashboardSchema: the dashboard has what Grafana needs to
// import it anywhere: a title, a uid, a schema version, a
// ${DS_PROMETHEUS} datasource input, and panels with a type, a grid
// position and (except rows) targets, every datasource the input.
func TestGrafanaDashboardSchema(t *testing.T) {
	d := loadDashboard(t)
	if d.Title == "" || d.UID == "" || d.SchemaVersion < 30 {
		t.Errorf("title %q uid %q schemaVersion %d: want all set, schemaVersion >= 30", d.Title, d.UID, d.SchemaVersion)
	}
	if len(d.Inputs) != 1 || d.Inputs[0].Name != "DS_PROMETHEUS" || d.Inputs[0].Type != "datasource" || d.Inputs[0].PluginID != "prometheus" {
		t.Errorf("__inputs %+v: want one prometheus datasource input DS_PROMETHEUS", d.Inputs)
	}
	if len(d.Panels) == 0 {
		t.Fatal("no panels")
	}
	ids := map[int]bool{}
	ds := func(where string, r *grafanaRef) {
		if r == nil || r.UID != "${DS_PROMETHEUS}" || r.Type != "prometheus" {
			t.Errorf("%s: datasource %+v, want {prometheus ${DS_PROMETHEUS}}", where, r)
		}
	}
	for _, p := range d.Panels {
		where := "panel " + p.Title
		if p.Title == "" || p.Type == "" {
			t.Errorf("panel %d: title %q type %q", p.ID, p.Title, p.Type)
		}
		if ids[p.ID] || p.ID == 0 {
			t.Errorf("%s: id %d missing or repeated", where, p.ID)
		}
		ids[p.ID] = true
		if p.GridPos == nil || p.GridPos.H == nil || p.GridPos.W == nil || p.GridPos.X == nil || p.GridPos.Y == nil ||
			*p.GridPos.W <= 0 || *p.GridPos.H <= 0 || *p.GridPos.X+*p.GridPos.W > 24 {
			t.Errorf("%s: gridPos %+v: want h, w, x, y within 24 columns", where, p.GridPos)
		}
		if p.Type == "row" {
			continue
		}
		ds(where, p.Datasource)
		if len(p.Targets) == 0 {
			t.Errorf("%s: no targets", where)
		}
		for _, tg := range p.Targets {
			if tg.RefID == "" || strings.TrimSpace(tg.Expr) == "" {
				t.Errorf("%s: target %+v: want refId and expr", where, tg)
			}
			ds(where+" target "+tg.RefID, tg.Datasource)
		}
	}
}

var (
	promString = regexp.MustCompile(`"(?:[^"\\]|\\.)*"`)
	promName   = regexp.MustCompile(`\b(?:(?:stowage|process|go)_[a-zA-Z0-9_:]+|up)\b`)
	descName   = regexp.MustCompile(`fqName: "([^"]+)"`)
	sampleName = regexp.MustCompile(`(?m)^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]`)
)

// usedMetrics are the metric names the dashboard's panels and the alert
// rules query, each with where it is used.
func usedMetrics(t *testing.T) map[string][]string {
	used := map[string][]string{}
	exprs := alertExprs(t)
	for k, v := range dashboardExprs(loadDashboard(t)) {
		exprs[k] = v
	}
	for where, es := range exprs {
		for _, e := range es {
			for _, n := range promName.FindAllString(promString.ReplaceAllString(e, `""`), -1) {
				used[n] = append(used[n], where)
			}
		}
	}
	return used
}

// describedMetrics are the metric names the controller's own collectors
// describe (they export some series only when there is something to count).
func describedMetrics(t *testing.T) map[string]bool {
	db, err := meta.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	cs := []prometheus.Collector{newStateCollector(db, datastore.New(db, nil, slog.New(slog.DiscardHandler))),
		newCopyEngineCollector(func() map[string]*stowagev1.CopyEngineCounters { return nil })}
	cs = append(cs, orphans.New(db, nil, 0, slog.New(slog.DiscardHandler)).Collectors()...)
	cs = append(cs, jobs.New(db, slog.New(slog.DiscardHandler)).Collectors()...)
	names := map[string]bool{}
	ch := make(chan *prometheus.Desc, 64)
	go func() {
		for _, c := range cs {
			c.Describe(ch)
		}
		close(ch)
	}()
	for d := range ch {
		if m := descName.FindStringSubmatch(d.String()); m != nil {
			names[m[1]] = true
		}
	}
	return names
}

// TestDeployMetricsExported: every metric the dashboard and the alert
// rules use is one Stowage exports: described by the controller's
// collectors, or scraped from the /metrics of a real controller after an
// RPC (RPC, Go and process metrics). "up" is Prometheus' own.
func TestDeployMetricsExported(t *testing.T) {
	exported := describedMetrics(t)
	exported["up"] = true
	if !testing.Short() {
		addr := freePort(t)
		server := "https://" + addr
		controllerProc(t, addr, filepath.Join(t.TempDir(), "ctl"))
		if _, stderr, code := cli(t, server, "store", "list"); code != 0 {
			t.Fatalf("store list: %d %s", code, stderr)
		}
		resp, err := httpGet(t, server, server+"/metrics")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("/metrics: %s", resp.Status)
		}
		for _, m := range sampleName.FindAllStringSubmatch(string(b), -1) {
			exported[m[1]] = true
		}
	}
	used := usedMetrics(t)
	if len(used) < 10 {
		t.Fatalf("only %d metric names found in the dashboard and rules: %v", len(used), used)
	}
	var names []string
	for n := range used {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if exported[n] {
			continue
		}
		if testing.Short() && (strings.HasPrefix(n, "stowage_rpc_") || strings.HasPrefix(n, "process_") || strings.HasPrefix(n, "go_")) {
			t.Logf("%s: not checked in -short (needs a real controller)", n)
			continue
		}
		t.Errorf("%s, used by %v, is not exported by Stowage", n, used[n])
	}
}
