package main

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

func TestParseSizeFlag(t *testing.T) {
	for in, want := range map[string]int64{
		"4096": 4096, "0": 0, "512M": 512 << 20, "10G": 10 << 30, "1T": 1 << 40, "1.5GiB": 3 << 29,
		"10g": 10 << 30, "2KiB": 2048, "2kb": 2048, "3B": 3, " 20 G ": 20 << 30, "0.5M": 512 << 10,
		"8589934592T": 0, // overflow: checked below
	} {
		got, err := parseSizeFlag("--size", in)
		if in == "8589934592T" {
			if err == nil {
				t.Errorf("parseSizeFlag(%q) = %d, want an overflow error", in, got)
			}
			continue
		}
		if err != nil || got != want {
			t.Errorf("parseSizeFlag(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "-1", "-1G", "G", "ten", "1.2.3G", "1e3", "0x10", "inf", "NaN", "10X", "10GG", "10Gi", "1iB", "1.3K", "0.1", "."} {
		_, err := parseSizeFlag("--size", in)
		var u usageError
		if !errors.As(err, &u) || exitCode(err) != 2 {
			t.Errorf("parseSizeFlag(%q): err %v, want a usage error", in, err)
			continue
		}
		if !strings.Contains(err.Error(), "10G") {
			t.Errorf("parseSizeFlag(%q): %v lacks an example", in, err)
		}
	}
}

func TestEnumFlags(t *testing.T) {
	if f, err := parseFormat("QCOW2", "raw", "qcow2"); err != nil || f != stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2 {
		t.Errorf("parseFormat(QCOW2) = %v, %v", f, err)
	}
	if f, err := parseFormat("", "raw", "qcow2"); err != nil || f != stowagev1.ImageFormat_IMAGE_FORMAT_UNSPECIFIED {
		t.Errorf("parseFormat(\"\") = %v, %v", f, err)
	}
	_, err := parseFormat("iso", "raw", "qcow2")
	if exitCode(err) != 2 || !strings.Contains(err.Error(), "want raw or qcow2") {
		t.Errorf("parseFormat(iso) for a volume: %v", err)
	}
	for in, want := range map[string]stowagev1.ImageFormat{"vhd": stowagev1.ImageFormat_IMAGE_FORMAT_VHD, "VHDX": stowagev1.ImageFormat_IMAGE_FORMAT_VHDX, "vmdk": stowagev1.ImageFormat_IMAGE_FORMAT_VMDK} {
		if f, err := parseFormat(in, "raw", "qcow2", "iso", "vhd", "vhdx", "vmdk"); err != nil || f != want {
			t.Errorf("parseFormat(%s) for a template = %v, %v", in, f, err)
		}
		if _, err := parseFormat(in, "raw", "qcow2"); exitCode(err) != 2 {
			t.Errorf("parseFormat(%s) for a volume: %v", in, err)
		}
	}
	st, err := enumFlag[stowagev1.JobState]("--state", "Running", stowagev1.JobState_value, "JOB_STATE_", "running", "failed")
	if err != nil || st != stowagev1.JobState_JOB_STATE_RUNNING {
		t.Errorf("--state Running = %v, %v", st, err)
	}
	if _, err := oneOf("--strategy", "fast", "auto", "reflink", "linked", "full"); err == nil || !strings.Contains(err.Error(), "auto, reflink, linked or full") {
		t.Errorf("--strategy fast: %v", err)
	}
}

func TestCheckChecksum(t *testing.T) {
	good := []string{"", "sha256:" + strings.Repeat("ab", 32), "md5:" + strings.Repeat("0", 32), "sha512:" + strings.Repeat("F", 128)}
	for _, s := range good {
		if err := checkChecksum(s); err != nil {
			t.Errorf("checkChecksum(%q): %v", s, err)
		}
	}
	for _, s := range []string{"abc", "sha256:abc", "sha1:" + strings.Repeat("a", 40), "sha256:" + strings.Repeat("zz", 32)} {
		if err := checkChecksum(s); exitCode(err) != 2 {
			t.Errorf("checkChecksum(%q): %v, want a usage error", s, err)
		}
	}
}

func TestPrintPlan(t *testing.T) {
	var b bytes.Buffer
	printPlan(&b, &stowagev1.Plan{
		Strategy: "linked-clone",
		Priority: "preferred",
		Steps: []*stowagev1.PlanStep{
			{Name: "spool-template", HostId: "h1", Reason: "not cached on primary1"},
			{Name: "clone", HostId: "h1", Reason: "qcow2 backing file", State: stowagev1.JobState_JOB_STATE_FAILED, Error: "disk full"},
		},
		Reasons: []string{"primary1: most free space", "primary2 refused: in maintenance"},
	})
	want := `Strategy:  linked-clone
Priority:  preferred

#  STEP            HOST  STATE   REASON                  ERROR
1  spool-template  h1    -       not cached on primary1  -
2  clone           h1    Failed  qcow2 backing file      disk full

Reasons:
  - primary1: most free space
  - primary2 refused: in maintenance
`
	if b.String() != want {
		t.Errorf("printPlan:\n%s\nwant:\n%s", b.String(), want)
	}

	b.Reset()
	printPlan(&b, &stowagev1.Plan{Strategy: "agent-to-agent", Steps: []*stowagev1.PlanStep{{Name: "copy", HostId: "h2", Reason: "source host"}}})
	if strings.Contains(b.String(), "ERROR") || strings.Contains(b.String(), "Reasons") || !strings.Contains(b.String(), "Priority:  -") {
		t.Errorf("printPlan without errors or reasons:\n%s", b.String())
	}
	b.Reset()
	printPlan(&b, nil)
	if !strings.Contains(b.String(), "no plan") {
		t.Errorf("printPlan(nil) = %q", b.String())
	}
}

func TestJobErrorExitCodes(t *testing.T) {
	for state, code := range map[stowagev1.JobState]int{
		stowagev1.JobState_JOB_STATE_SUCCEEDED: 0,
		stowagev1.JobState_JOB_STATE_FAILED:    1,
		stowagev1.JobState_JOB_STATE_CANCELLED: 130,
	} {
		err := jobError(&stowagev1.Job{Id: "j1", State: state, Error: "boom"})
		got := 0
		if err != nil {
			got = exitCode(err)
		}
		if got != code {
			t.Errorf("job %v: exit %d (%v), want %d", state, got, err, code)
		}
	}
}

func TestProgressString(t *testing.T) {
	for _, c := range []struct {
		p    *stowagev1.JobProgress
		rate bool
		want string
	}{
		{nil, true, "-"},
		{&stowagev1.JobProgress{BytesDone: 1 << 30, BytesTotal: 4 << 30, BytesPerSecond: 100 << 20}, true, "1.0 GiB / 4.0 GiB (25%), 100.0 MiB/s"},
		{&stowagev1.JobProgress{BytesDone: 1 << 30, BytesTotal: 4 << 30, BytesPerSecond: 100 << 20}, false, "1.0 GiB / 4.0 GiB (25%)"},
		{&stowagev1.JobProgress{BytesDone: 2048}, false, "2.0 KiB"},
	} {
		if got := progressString(c.p, c.rate); got != c.want {
			t.Errorf("progressString(%v) = %q, want %q", c.p, got, c.want)
		}
	}
}
