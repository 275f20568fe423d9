package main

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/chromedp/chromedp"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// chromiumPath finds Debian's chromium (scripts/test.sh installs it).
func chromiumPath(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("chromium is required (scripts/test.sh installs it)")
	}
	t.Skip("no chromium on this machine (apt-get install chromium)")
	return ""
}

// spkiPin is the base64 SHA-256 of the public key of the certificate the
// server at addr presents: Chromium trusts that key alone
// (--ignore-certificate-errors-spki-list), not any certificate.
func spkiPin(t *testing.T, addr string) string {
	t.Helper()
	conn, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true}) // only to read the key it presents
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	sum := sha256.Sum256(conn.ConnectionState().PeerCertificates[0].RawSubjectPublicKeyInfo)
	return base64.StdEncoding.EncodeToString(sum[:])
}

// TestWebDashboard opens the controller's dashboard in headless Chromium
// (chromedp): a wrong token is refused, a reader token shows the real
// stores, hosts, templates and volumes, a running job's progress moves
// live (WatchJob) until Succeeded, its plan's reasons show, and the page's
// security headers are set. A screenshot goes to $STOWAGE_TEST_ARTIFACTS.
func TestWebDashboard(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes and a browser")
	}
	chrome := chromiumPath(t)
	ctx := context.Background()
	root, server, _ := oneHost(t, nil, nil)
	a := newAPI(server)
	addStore(t, a, "primary1", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "p1"), &stowagev1.Scope{Zone: "z1"})
	addStore(t, a, "images", stowagev1.StoreRole_STORE_ROLE_IMAGE, filepath.Join(root, "img"), &stowagev1.Scope{Zone: "z1"})
	if _, errOut, code := cli(t, server, "store", "update", "primary1", "--tag", "ssd"); code != 0 {
		t.Fatal(errOut)
	}
	vol, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "data1", Size: 64 << 20}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, vol.Msg.GetJob())
	var reader struct {
		Secret string `json:"secret"`
	}
	cliJSON(t, server, &reader, "token", "create", "--name", "dashboard", "--role", "reader")

	// The page and its headers.
	resp, err := httpGet(t, server, server+"/ui/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(resp.Header.Get("Content-Security-Policy"), "script-src 'self'") ||
		resp.Header.Get("X-Content-Type-Options") != "nosniff" || !strings.Contains(resp.Header.Get("Content-Security-Policy"), "frame-ancestors 'none'") {
		t.Fatalf("GET /ui/: %d, headers %v", resp.StatusCode, resp.Header)
	}

	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chrome),
		chromedp.NoSandbox, // root in a container; the page is ours
		chromedp.Flag("ignore-certificate-errors-spki-list", spkiPin(t, strings.TrimPrefix(server, "https://"))),
		chromedp.WindowSize(1400, 1300),
		chromedp.Flag("user-data-dir", filepath.Join(root, "chromium")),
	)
	actx, cancelA := chromedp.NewExecAllocator(ctx, opts...)
	defer cancelA()
	bctx, cancelB := chromedp.NewContext(actx)
	defer cancelB()
	bctx, cancelT := context.WithTimeout(bctx, 2*time.Minute)
	defer cancelT()
	do := func(what string, actions ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		if err := chromedp.Do(bctx, actions...); err != nil {
			t.Fatalf("browser: %s: %v", what, err)
		}
	}
	text := func(sel string) string {
		t.Helper()
		v, err := chromedp.Run(bctx, chromedp.Text(chromedp.CSS(sel)))
		if err != nil {
			t.Fatalf("browser: text of %s: %v", sel, err)
		}
		return v
	}
	attr := func(sel, name string) string {
		t.Helper()
		v, err := chromedp.Run(bctx, chromedp.AttributeValue(chromedp.CSS(sel), name))
		if err != nil {
			t.Fatalf("browser: attribute %s of %s: %v", name, sel, err)
		}
		return v.Value
	}

	// A wrong token: refused, the login shows why.
	do("wrong token",
		chromedp.Navigate(server+"/ui/"),
		chromedp.WaitVisible(chromedp.CSS("#token")),
		chromedp.SendKeys(chromedp.CSS("#token"), "stw_not-a-token"),
		chromedp.Click(chromedp.CSS("#login-form button")))
	if _, err := chromedp.Run(bctx, chromedp.Poll[bool](`document.getElementById("login-error").textContent.length > 0`, chromedp.WithPollingTimeout(10*time.Second))); err != nil {
		body, _ := chromedp.Run(bctx, chromedp.Evaluate[string](`document.body.innerText + " | status: " + document.getElementById("status").textContent + " | logout: " + typeof logout + " | scripts: " + document.scripts.length + " " + document.scripts[0].src`))
		t.Fatalf("no login error with a wrong token: %v; page: %s", err, body)
	}
	if e := text("#login-error"); !strings.Contains(e, "unauthenticated") {
		t.Fatalf("login error with a wrong token: %q", e)
	}

	// The reader token: the real stores, host, volume.
	do("reader token",
		chromedp.SendKeys(chromedp.CSS("#token"), reader.Secret),
		chromedp.Click(chromedp.CSS("#login-form button")),
		chromedp.WaitVisible(chromedp.CSS(`#stores tr[data-store="primary1"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#hosts tr[data-host="h1"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#volumes tr[data-volume="data1"]`)))
	for sel, want := range map[string][]string{
		"#stores":  {"primary1", "images", "Up", "ssd", "%)"},
		"#hosts":   {"h1", "Up", "s ago"},
		"#volumes": {"data1", "Ready", "primary1", "64.0 MiB"},
	} {
		got := text(sel)
		for _, w := range want {
			if !strings.Contains(got, w) {
				t.Errorf("dashboard table %s lacks %q:\n%s", sel, w, got)
			}
		}
	}

	// A slow template download: its progress moves on the page without a
	// reload (the Watch stream), then it says Succeeded.
	raw := filepath.Join(root, "web", "t.raw")
	if err := os.MkdirAll(filepath.Dir(raw), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(raw, []byte(strings.Repeat("dashboard", 12<<20)), 0o644); err != nil { // 108 MiB at ~12 MiB/s: ~9 s
		t.Fatal(err)
	}
	origin := httptest.NewServer(slowHandler(raw))
	defer origin.Close()
	reg, err := a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: "slow", Url: origin.URL + "/t.raw",
		Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW, Checksum: "sha256:" + sha256File(t, raw)}))
	if err != nil {
		t.Fatal(err)
	}
	jobID := reg.Msg.GetJob().GetId()
	row := `#jobs tr[data-job="` + jobID + `"]`
	// Its detail (plan, steps, reasons) open while it runs.
	do("job row", chromedp.WaitVisible(chromedp.CSS(row)), chromedp.Click(chromedp.CSS(row)), chromedp.WaitVisible(chromedp.CSS("#job-reasons")))
	var png []byte // mid-run: the picture for the README
	seen := map[int64]bool{}
	var trail []string
	deadline := time.Now().Add(90 * time.Second)
	final := ""
	for time.Now().Before(deadline) {
		st := attr(row, "data-state")
		trail = append(trail, st+":"+attr(row, "data-done"))
		if n, err := strconv.ParseInt(attr(row, "data-done"), 10, 64); err == nil && n > 0 && st == "Running" {
			seen[n] = true
			if len(seen) == 3 && png == nil {
				if png, err = chromedp.Run(bctx, chromedp.FullScreenshot(100)); err != nil {
					t.Fatal(err)
				}
			}
		}
		if st == "Succeeded" || st == "Failed" {
			final = st
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if final != "Succeeded" {
		t.Fatalf("the dashboard shows the job %q at the end (want Succeeded); progress values seen: %v", final, seen)
	}
	if len(seen) < 2 {
		t.Errorf("the job's progress did not move on the page: values seen while Running: %v (status line: %q, stream messages %s)", seen, text("#status"), attr(row, "data-updates"))
	}
	t.Logf("progress values seen on the page while the job ran: %d distinct; trail %v", len(seen), trail)

	// Its plan's reasons, and its end, in the detail.
	if reasons := text("#job-detail"); !strings.Contains(reasons, "store images") || !strings.Contains(reasons, "Succeeded") {
		t.Errorf("job detail lacks its plan's reasons:\n%s", reasons)
	}
	do("templates", chromedp.WaitVisible(chromedp.CSS(`#templates tr[data-template="slow"]`)))

	if len(png) < 1000 || string(png[1:4]) != "PNG" {
		t.Fatalf("screenshot: %d bytes", len(png))
	}
	dir := os.Getenv("STOWAGE_TEST_ARTIFACTS")
	if dir == "" {
		dir = t.TempDir()
	}
	shot := filepath.Join(dir, "dashboard.png")
	if err := os.WriteFile(shot, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s (%d bytes)", shot, len(png))
}
