// Command benchreport turns the raw results of bench/run.sh and
// bench/fuse.sh (TSV rows from shared/bench/peers.sh, bench/extra.sh and
// bench/fuse.sh, all measured in one invocation) into a markdown table of
// same-run ratios, Stowage against the best peer and the target peer, and a
// PNG bar chart: copies (sections b, c, x), NBD exports (d) and the FUSE
// template cache (e: cold and warm reads against the direct read, and the
// first byte of a never-read template).
//
//	go run ./bench/cmd/benchreport -tsv peers.tsv -tsv extra.tsv -md out.md -png out.png
//
// A TSV row is: section, test, unit, median, min, max, note. The rows of our
// program start with -ours (default "stowage"). With -merge, rows of the
// same section, test and unit from several TSVs (several invocations of one
// script, each with RUNS=1, as bench/fuse.sh does) become one row: the
// median of their medians, the least minimum and the greatest maximum.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"io"
	"log/slog"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"
)

// row is one measured figure.
type row struct {
	sec, name, unit string
	median, lo, hi  float64
	ok              bool
	note            string
}

// scenario picks the rows of one comparison from the results.
type scenario struct {
	title  string
	sec    string
	match  func(name string) bool
	trim   func(name string) string // label in the chart
	target string                   // label prefix of the peer the issue names
	min    float64                  // required ratio against the target
	// unit of the rows (default MiB/s, higher is better); "ms" rows are
	// latencies, lower is better, with an absolute target maxMs.
	unit  string
	maxMs float64
}

func (s scenario) rowUnit() string {
	if s.unit == "" {
		return "MiB/s"
	}
	return s.unit
}

type tsvList []string

func (l *tsvList) String() string     { return strings.Join(*l, ",") }
func (l *tsvList) Set(s string) error { *l = append(*l, s); return nil }

func main() {
	var tsvs tsvList
	flag.Var(&tsvs, "tsv", "results TSV (repeatable)")
	md := flag.String("md", "", "markdown output (default stdout)")
	pngOut := flag.String("png", "", "PNG chart output")
	ours := flag.String("ours", "stowage", "label prefix of our program's rows")
	command := flag.String("cmd", "", "the command that produced the results, quoted in the report")
	facts := flag.String("facts", "", "file with machine facts (markdown list) to include")
	merge := flag.Bool("merge", false, "merge rows of the same section, test and unit across the TSVs (median of medians)")
	title := flag.String("title", "Copy benchmark", "report heading")
	flag.Parse()
	if len(tsvs) == 0 {
		fmt.Fprintln(os.Stderr, "benchreport: at least one -tsv is required")
		os.Exit(2)
	}
	var rows []row
	for _, p := range tsvs {
		r, err := readTSV(p)
		if err != nil {
			slog.Error("benchreport: reading results", "path", p, "err", err)
			os.Exit(1)
		}
		rows = append(rows, r...)
	}
	if *merge {
		rows = mergeRows(rows)
	}
	out := io.Writer(os.Stdout)
	if *md != "" {
		f, err := os.Create(*md)
		if err != nil {
			slog.Error("benchreport: creating report", "err", err)
			os.Exit(1)
		}
		defer f.Close()
		out = f
	}
	scen := scenarios()
	writeMarkdown(out, *title, rows, scen, *ours, *command, *facts)
	if *pngOut != "" {
		if err := writePNG(*pngOut, rows, scen, *ours); err != nil {
			slog.Error("benchreport: writing chart", "err", err)
			os.Exit(1)
		}
	}
}

func scenarios() []scenario {
	suffix := func(s string) func(string) bool { return func(n string) bool { return strings.HasSuffix(n, s) } }
	trimSuffix := func(s string) func(string) string { return func(n string) string { return strings.TrimSuffix(n, s) } }
	return []scenario{
		{title: "dense copy, cold source", sec: "b", match: suffix(" (cold src)"), trim: trimSuffix(" (cold src)"), target: "nbdcopy file->file", min: 1.0},
		{title: "dense copy, warm source", sec: "b", match: suffix(" (warm src)"), trim: trimSuffix(" (warm src)"), target: "nbdcopy file->file", min: 1.0},
		{title: "sparse copy (10% data), cold", sec: "c", match: func(string) bool { return true }, trim: func(n string) string { return n }, target: "qemu-img convert -W -m 8 -O raw", min: 1.0},
		{title: "zero-filled dense image, cold", sec: "x", match: func(n string) bool { return strings.HasPrefix(n, "zero-filled: ") },
			trim: func(n string) string { return strings.TrimPrefix(n, "zero-filled: ") }, target: "qemu-img convert -W -m 8 -O raw", min: 1.0},
		{title: "NBD export read, warm source (nbdcopy -> null:)", sec: "d", match: suffix(": nbdcopy -> null: (warm src)"),
			trim: trimSuffix(": nbdcopy -> null: (warm src)"), target: "nbdkit file (unix)", min: 1.0},
		{title: "NBD export read, cold source (nbdcopy -> null:)", sec: "d", match: suffix(": nbdcopy -> null: (cold src)"),
			trim: trimSuffix(": nbdcopy -> null: (cold src)"), target: "nbdkit file (unix)", min: 1.0},
		{title: "NBD export write + flush (nbdcopy file -> export)", sec: "d", match: suffix(": nbdcopy file -> export (write, flush)"),
			trim: trimSuffix(": nbdcopy file -> export (write, flush)"), target: "nbdkit file (unix)", min: 1.0},
		{title: "FUSE cache: first byte of a never-read template", sec: "e", match: suffix(", first byte (dd bs=4k count=1, cold)"),
			trim: trimSuffix(", first byte (dd bs=4k count=1, cold)"), target: "direct (no FUSE)", unit: "ms", maxMs: 50},
		{title: "FUSE cache: cold sequential read (dd bs=1M) vs the source", sec: "e", match: suffix(", cold"),
			trim: trimSuffix(", cold"), target: "direct (no FUSE)", min: 0.8},
		{title: "FUSE cache: warm read of a complete template (dd bs=1M)", sec: "e", match: suffix(", warm"),
			trim: trimSuffix(", warm"), target: "direct (no FUSE)", min: 0.9},
		{title: "dense image into an iSCSI LUN (bench/iscsi.sh)", sec: "i", match: func(n string) bool { return strings.HasPrefix(n, "dense into a LUN") },
			trim: func(n string) string { _, t, _ := strings.Cut(n, "): "); return t }, target: "qemu-img convert -n", min: 1.0},
		{title: "sparse image (10% data) into an iSCSI LUN (bench/iscsi.sh)", sec: "i", match: func(n string) bool { return strings.HasPrefix(n, "sparse into a LUN") },
			trim: func(n string) string { _, t, _ := strings.Cut(n, "): "); return t }, target: "qemu-img convert -n", min: 1.0},
	}
}

// mergeRows folds rows of the same section, test and unit into one (in the
// order of their first appearance): the median of the medians of the rows
// that did not fail, the least minimum and the greatest maximum, and the
// note of the first with the number of merged rows appended.
func mergeRows(rows []row) []row {
	type key struct{ sec, name, unit string }
	var order []key
	byKey := map[key][]row{}
	for _, r := range rows {
		k := key{r.sec, r.name, r.unit}
		if r.unit == "" || r.unit == "-" {
			k.unit = ""
		}
		if _, ok := byKey[k]; !ok {
			order = append(order, k)
		}
		byKey[k] = append(byKey[k], r)
	}
	out := make([]row, 0, len(order))
	for _, k := range order {
		rs := byKey[k]
		var ok []row
		for _, r := range rs {
			if r.ok {
				ok = append(ok, r)
			}
		}
		if len(ok) == 0 {
			out = append(out, rs[0])
			continue
		}
		m := ok[0]
		meds := make([]float64, 0, len(ok))
		for _, r := range ok {
			meds = append(meds, r.median)
			m.lo = min(m.lo, r.lo)
			m.hi = max(m.hi, r.hi)
		}
		sort.Float64s(meds)
		n := len(meds)
		if n%2 == 1 {
			m.median = meds[n/2]
		} else {
			m.median = (meds[n/2-1] + meds[n/2]) / 2
		}
		m.note = strings.TrimSpace(fmt.Sprintf("%s (median of %d invocations", m.note, n))
		if len(ok) < len(rs) {
			m.note += fmt.Sprintf(", %d failed", len(rs)-len(ok))
		}
		m.note += ")"
		out = append(out, m)
	}
	return out
}

func readTSV(path string) ([]row, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var rows []row
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Split(sc.Text(), "\t")
		if len(fs) < 7 {
			continue
		}
		r := row{sec: fs[0], name: fs[1], unit: fs[2], note: fs[6]}
		var e1, e2, e3 error
		r.median, e1 = strconv.ParseFloat(fs[3], 64)
		r.lo, e2 = strconv.ParseFloat(fs[4], 64)
		r.hi, e3 = strconv.ParseFloat(fs[5], 64)
		r.ok = e1 == nil && e2 == nil && e3 == nil && !strings.Contains(r.note, "FAILED")
		rows = append(rows, r)
	}
	return rows, sc.Err()
}

// pick returns the rows of a scenario, ours first.
func pick(rows []row, s scenario, ours string) (our *row, peers []row) {
	for i := range rows {
		r := rows[i]
		if r.sec != s.sec || !s.match(r.name) || !r.ok || r.unit != s.rowUnit() {
			continue
		}
		if strings.HasPrefix(s.trim(r.name), ours) {
			if our == nil {
				our = &rows[i]
			}
			continue
		}
		peers = append(peers, r)
	}
	if s.rowUnit() == "ms" {
		sort.Slice(peers, func(i, j int) bool { return peers[i].median < peers[j].median })
	} else {
		sort.Slice(peers, func(i, j int) bool { return peers[i].median > peers[j].median })
	}
	return our, peers
}

func writeMarkdown(w io.Writer, title string, rows []row, scen []scenario, ours, command, factsPath string) {
	fmt.Fprintf(w, "## %s, %s\n\n", title, time.Now().UTC().Format("2006-01-02 15:04 MST"))
	if command != "" {
		fmt.Fprintf(w, "Command: `%s`\n\n", command)
	}
	if factsPath != "" {
		if b, err := os.ReadFile(factsPath); err == nil {
			fmt.Fprintf(w, "%s\n", strings.TrimSpace(string(b)))
			fmt.Fprintln(w)
		}
	}
	fmt.Fprintln(w, "Every figure is the median of the runs of one invocation (MiB/s of virtual size; copies are timed until `sync`),")
	fmt.Fprintln(w, "or with -merge the median of several invocations' figures; ratios compare figures of the same invocations.")
	fmt.Fprintln(w, "Gaps under about 30% are within this machine's noise. A latency row (ms) is met under its absolute target.")
	fmt.Fprintln(w)
	fmt.Fprintf(w, "| scenario | %s | best peer | %s / best peer | target peer | %s / target | target | met |\n", ours, ours, ours)
	fmt.Fprintln(w, "|---|---:|---|---:|---|---:|---:|---|")
	for _, s := range scen {
		our, peers := pick(rows, s, ours)
		if our == nil && len(peers) == 0 {
			continue // a scenario of another script
		}
		if s.rowUnit() == "ms" {
			latencyRow(w, s, our, peers)
			continue
		}
		if our == nil || len(peers) == 0 {
			fmt.Fprintf(w, "| %s | - | - | - | %s | - | %.1fx | not measured |\n", s.title, s.target, s.min)
			continue
		}
		best := peers[0]
		var target *row
		for i := range peers {
			if strings.HasPrefix(s.trim(peers[i].name), s.target) {
				target = &peers[i]
				break
			}
		}
		tr, met := "-", "no target row"
		if target != nil {
			ratio := our.median / target.median
			tr = fmt.Sprintf("%.2fx", ratio)
			met = "yes"
			if ratio < s.min {
				met = fmt.Sprintf("no (%.0f%% short)", (1-ratio/s.min)*100)
			}
		}
		if n := allocNote(*our); n != "" {
			met += "; " + n
		}
		fmt.Fprintf(w, "| %s | %.0f | %s (%.0f) | %.2fx | %s | %s | %.1fx | %s |\n",
			s.title, our.median, s.trim(best.name), best.median, our.median/best.median, s.target, tr, s.min, met)
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "All rows (the last column is %s's median divided by the row's, within the same scenario):\n\n", ours)
	fmt.Fprintln(w, "| sec | test | median | min | max | unit | ratio | note |")
	fmt.Fprintln(w, "|---|---|---:|---:|---:|---|---:|---|")
	for _, r := range rows {
		ratio := "-"
		for _, s := range scen {
			if r.sec == s.sec && s.match(r.name) && r.ok {
				if our, _ := pick(rows, s, ours); our != nil && r.median > 0 {
					ratio = fmt.Sprintf("%.2fx", our.median/r.median)
				}
				break
			}
		}
		if !r.ok {
			fmt.Fprintf(w, "| %s | %s | - | - | - | %s | - | %s |\n", r.sec, r.name, r.unit, r.note)
			continue
		}
		fmt.Fprintf(w, "| %s | %s | %.1f | %.1f | %.1f | %s | %s | %s |\n", r.sec, r.name, r.median, r.lo, r.hi, r.unit, ratio, r.note)
	}
}

// latencyRow is a scenario's line for a latency: ours against the fastest
// peer and the target peer (how many times slower), met under maxMs.
func latencyRow(w io.Writer, s scenario, our *row, peers []row) {
	if our == nil {
		fmt.Fprintf(w, "| %s | - | - | - | %s | - | < %.0f ms | not measured |\n", s.title, s.target, s.maxMs)
		return
	}
	best, bestRatio, tr := "-", "-", "-"
	if len(peers) > 0 {
		best = fmt.Sprintf("%s (%.1f ms)", s.trim(peers[0].name), peers[0].median)
		bestRatio = fmt.Sprintf("%.2fx the time", our.median/peers[0].median)
		for _, p := range peers {
			if strings.HasPrefix(s.trim(p.name), s.target) {
				tr = fmt.Sprintf("%.2fx the time", our.median/p.median)
				break
			}
		}
	}
	met := "yes"
	if our.median >= s.maxMs {
		met = "no"
	}
	fmt.Fprintf(w, "| %s | %.1f ms | %s | %s | %s | %s | < %.0f ms | %s |\n", s.title, our.median, best, bestRatio, s.target, tr, s.maxMs, met)
}

// allocNote reports the destination allocation recorded in a row's note.
func allocNote(r row) string {
	if i := strings.Index(r.note, "dst allocated"); i >= 0 {
		n := r.note[i:]
		if j := strings.Index(n, ";"); j >= 0 {
			n = n[:j]
		}
		return n
	}
	return ""
}

// writePNG draws one group of horizontal bars per scenario.
func writePNG(path string, rows []row, scen []scenario, ours string) error {
	const (
		scale   = 2
		lineH   = 9 * scale
		barH    = 7 * scale
		labelW  = 44 * 6 * scale
		barMaxW = 520
		margin  = 20
		width   = margin + labelW + 10 + barMaxW + 120
	)
	type group struct {
		title string
		bars  []row
		ours  int
	}
	var groups []group
	height := margin
	for _, s := range scen {
		our, peers := pick(rows, s, ours)
		if our == nil && len(peers) == 0 {
			continue
		}
		g := group{title: s.title + " (" + s.rowUnit() + ", median)", ours: -1}
		if our != nil {
			g.bars = append(g.bars, *our)
			g.ours = 0
		}
		g.bars = append(g.bars, peers...)
		for i := range g.bars {
			g.bars[i].name = s.trim(g.bars[i].name)
		}
		groups = append(groups, g)
		height += lineH*2 + len(g.bars)*lineH + 12
	}
	height += margin
	img := image.NewRGBA(image.Rect(0, 0, width, height))
	white := color.RGBA{255, 255, 255, 255}
	for y := range height {
		for x := range width {
			img.Set(x, y, white)
		}
	}
	black := color.RGBA{20, 20, 20, 255}
	peerC := color.RGBA{90, 120, 170, 255}
	ourC := color.RGBA{230, 120, 20, 255}
	y := margin
	for _, g := range groups {
		drawText(img, margin, y, scale, g.title, black)
		y += lineH * 2
		maxV := 0.0
		for _, b := range g.bars {
			maxV = max(maxV, b.median)
		}
		for i, b := range g.bars {
			name := b.name
			if len(name) > 44 {
				name = name[:44]
			}
			c := peerC
			if i == g.ours {
				c = ourC
			}
			drawText(img, margin, y, scale, name, black)
			w := int(b.median / maxV * barMaxW)
			x0 := margin + labelW + 10
			for yy := y; yy < y+barH; yy++ {
				for xx := x0; xx < x0+w; xx++ {
					img.Set(xx, yy, c)
				}
			}
			prec := 0
			if b.median < 100 {
				prec = 1
			}
			drawText(img, x0+w+6, y, scale, strconv.FormatFloat(b.median, 'f', prec, 64), black)
			y += lineH
		}
		y += 12
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := png.Encode(f, img); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
