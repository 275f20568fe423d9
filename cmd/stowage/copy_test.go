package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"math/bits"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stowage/stowage/datapath/stream"
)

// buildStowage is the stowage binary TestMain built (with -race when the
// tests run with it).
func buildStowage(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("runs the binary")
	}
	return stowageBin
}

// writeImage writes a file of size bytes: random data with a hole and a
// run of allocated zeros in the middle.
func writeImage(t *testing.T, path string, size int64) []byte {
	t.Helper()
	b := make([]byte, size)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	clear(b[size/4 : size/4+size/8])
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

func sum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func fileSum(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sum(b)
}

// doneChunks counts the chunks a checkpoint file lists as done.
func doneChunks(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	var c struct {
		Done []byte `json:"done"`
	}
	if json.Unmarshal(b, &c) != nil {
		return 0
	}
	n := 0
	for _, x := range c.Done {
		n += bits.OnesCount8(x)
	}
	return n
}

func exitCodeOf(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

// TestCopyKill9Resume kills a running `stowage copy` with SIGKILL and
// checks that `--resume` finishes it with identical bytes.
func TestCopyKill9Resume(t *testing.T) {
	bin := buildStowage(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	content := writeImage(t, src, 48<<20+4321)
	dst := filepath.Join(dir, "dst.raw")

	cmd := exec.Command(bin, "copy", "--chunk-size", "1MiB", "--rate-limit", "16MiB", src, dst)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ckpt := stream.CheckpointPathFor(dst)
	deadline := time.Now().Add(20 * time.Second)
	for doneChunks(ckpt) < 8 {
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("no checkpoint with progress appeared; stderr: %s", stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := cmd.Process.Kill(); err != nil { // SIGKILL
		t.Fatal(err)
	}
	cmd.Wait()
	if _, err := os.Stat(dst); !os.IsNotExist(err) {
		t.Fatal("a killed copy left a visible destination")
	}
	if _, err := os.Stat(stream.TempPath(dst)); err != nil {
		t.Fatal("the partial copy was not kept")
	}

	out, err := exec.Command(bin, "copy", "--resume", "--chunk-size", "1MiB", "--sha256", "-o", "json", src, dst).Output()
	if err != nil {
		t.Fatalf("resume: %v", err)
	}
	var res struct {
		Size         int64  `json:"size"`
		BytesResumed int64  `json:"bytes_resumed"`
		BytesRead    int64  `json:"bytes_read"`
		Resumed      bool   `json:"resumed"`
		SHA256       string `json:"sha256"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("summary %q: %v", out, err)
	}
	if !res.Resumed || res.BytesResumed < 8<<20 {
		t.Fatalf("resume did not reuse the checkpoint: %s", out)
	}
	if fileSum(t, dst) != sum(content) || res.SHA256 != sum(content) {
		t.Fatal("resumed copy differs from the source")
	}
	if _, err := os.Stat(ckpt); !os.IsNotExist(err) {
		t.Fatal("checkpoint left behind")
	}

	// verify: equal, then different (exit 7)
	if out, err := exec.Command(bin, "verify", src, dst).CombinedOutput(); err != nil {
		t.Fatalf("verify equal: %v %s", err, out)
	}
	f, _ := os.OpenFile(dst, os.O_RDWR, 0)
	f.WriteAt([]byte{content[1000] ^ 1}, 1000)
	f.Close()
	out, err = exec.Command(bin, "verify", "-o", "json", src, dst).Output()
	if exitCodeOf(err) != 7 || !strings.Contains(string(out), `"first_difference": 1000`) {
		t.Fatalf("verify different: exit %d %s", exitCodeOf(err), out)
	}
}

// TestCopyChecksumMismatchLeavesNothing checks exit code 7 and that no file
// is left at the destination.
func TestCopyChecksumMismatchLeavesNothing(t *testing.T) {
	bin := buildStowage(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	content := writeImage(t, src, 3<<20+1)
	out := filepath.Join(dir, "out", "dst.raw")
	os.Mkdir(filepath.Dir(out), 0o755)
	err := exec.Command(bin, "copy", "--checksum", "sha256:"+strings.Repeat("ab", 32), src, out).Run()
	if exitCodeOf(err) != 7 {
		t.Fatalf("exit %d, want 7", exitCodeOf(err))
	}
	if ents, _ := os.ReadDir(filepath.Dir(out)); len(ents) != 0 {
		t.Fatalf("left behind: %v", ents)
	}
	b, err := exec.Command(bin, "copy", "-o", "json", "--checksum", "sha256:"+sum(content), src, out).Output()
	if err != nil {
		t.Fatalf("good checksum: %v", err)
	}
	if !strings.Contains(string(b), sum(content)) {
		t.Fatalf("summary lacks the checksum: %s", b)
	}
	if err := exec.Command(bin, "copy", "--chunk-size", "3k", src, out).Run(); exitCodeOf(err) != 2 {
		t.Fatalf("bad chunk size: exit %d, want 2", exitCodeOf(err))
	}
}

func TestParseCopySize(t *testing.T) {
	for in, want := range map[string]int64{"4194304": 4 << 20, "4M": 4 << 20, "4MiB": 4 << 20, "512k": 512 << 10, "1G": 1 << 30, "2gb": 2 << 30} {
		if got, err := parseCopySize(in); err != nil || got != want {
			t.Errorf("%s: %d %v", in, got, err)
		}
	}
	if _, err := parseCopySize("x"); err == nil {
		t.Error("x parsed")
	}
}
