package connector

import (
	"strconv"
	"strings"
)

// discovered is one line of iscsiadm -m discovery -t sendtargets:
//
//	10.0.0.5:3260,1 iqn.2026-01.org.stowage:store1
//	[fd00::5]:3260,1 iqn.2026-01.org.stowage:store1
type discovered struct {
	Portal string
	TPGT   int
	IQN    string
}

func parseDiscovery(out string) []discovered {
	var ds []discovered
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		portal, tpgt, ok := splitTPGT(f[0])
		if !ok {
			continue
		}
		ds = append(ds, discovered{Portal: portal, TPGT: tpgt, IQN: f[1]})
	}
	return ds
}

// parseSessions reads iscsiadm -m session:
//
//	tcp: [1] 10.0.0.5:3260,1 iqn.2026-01.org.stowage:store1 (non-flash)
func parseSessions(out string) []Session {
	var ss []Session
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 4 || !strings.HasSuffix(f[0], ":") || !strings.HasPrefix(f[1], "[") || !strings.HasSuffix(f[1], "]") {
			continue
		}
		id, err := strconv.Atoi(strings.Trim(f[1], "[]"))
		if err != nil {
			continue
		}
		portal, tpgt, ok := splitTPGT(f[2])
		if !ok {
			continue
		}
		ss = append(ss, Session{ID: id, Transport: strings.TrimSuffix(f[0], ":"), Portal: portal, TPGT: tpgt, IQN: f[3]})
	}
	return ss
}

// splitTPGT splits "IP:PORT,TPGT".
func splitTPGT(s string) (string, int, bool) {
	i := strings.LastIndexByte(s, ',')
	if i <= 0 {
		return "", 0, false
	}
	tpgt, err := strconv.Atoi(s[i+1:])
	if err != nil {
		return "", 0, false
	}
	return s[:i], tpgt, true
}
