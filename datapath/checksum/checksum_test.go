package checksum

import (
	"encoding/hex"
	"errors"
	"strings"
	"testing"

	"github.com/stowage/stowage/errdefs"
)

func TestParse(t *testing.T) {
	sha := strings.Repeat("ab", 32)
	for in, want := range map[string]Sum{
		"":                                   {},
		"sha256:" + strings.ToUpper(sha):     {Algo: "sha256", Hex: sha},
		"{SHA-256}" + sha:                    {Algo: "sha256", Hex: sha},
		sha:                                  {Algo: "sha256", Hex: sha},
		strings.Repeat("0", 32):              {Algo: "md5", Hex: strings.Repeat("0", 32)},
		"sha512:" + strings.Repeat("1", 128): {Algo: "sha512", Hex: strings.Repeat("1", 128)},
	} {
		got, err := Parse(in)
		if err != nil || got != want {
			t.Errorf("Parse(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"sha1:abcd", "sha256:xyz", "{SHA-256" + sha, "sha256:" + sha[:10], "abc"} {
		if _, err := Parse(bad); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("Parse(%q): err = %v, want ErrInvalid", bad, err)
		}
	}
}

func TestCheck(t *testing.T) {
	h := New("sha256")
	h.Write([]byte("abc"))
	got := hex.EncodeToString(h.Sum(nil))
	sum, err := Parse("sha256:" + got)
	if err != nil {
		t.Fatal(err)
	}
	if err := sum.Check(got); err != nil {
		t.Errorf("Check of the right digest: %v", err)
	}
	if err := sum.Check(strings.Repeat("0", 64)); !errors.Is(err, errdefs.ErrDataLoss) || !strings.Contains(err.Error(), "mismatch") {
		t.Errorf("Check of a wrong digest: %v", err)
	}
}
