package tgt

import (
	"bufio"
	"fmt"
	"strconv"
	"strings"

	"github.com/stowage/stowage/errdefs"
)

// Target is one target as `tgtadm --op show --mode target` lists it.
type Target struct {
	TID  int    // tgt's target id; local to this tgtd
	IQN  string // the target's name
	LUNs []LUN  // without LUN 0, the controller LUN tgt adds to every target
	// Accounts are the CHAP users bound to the target (incoming).
	Accounts []string
	// ACLs are the initiator names or addresses allowed to log in
	// ("ALL" for anyone).
	ACLs []string
	// Sessions counts the I_T nexuses: initiators logged in now.
	Sessions int
	// Nexuses are those sessions: who is logged in, over which
	// connections.
	Nexuses []Nexus
}

// Nexus is one I_T nexus (an iSCSI session) of a target.
type Nexus struct {
	SID       int    // tgt's session id ("I_T nexus: <sid>")
	Initiator string // the initiator's name
	CIDs      []int  // its connections
}

// LUN is one logical unit of a target.
type LUN struct {
	Number  int
	Backing string // "Backing store path"
	// Size is the size tgt serves, as tgtadm prints it: whole megabytes
	// (10^6 bytes), rounded to the nearest. It is tgt's view, fixed when
	// the LUN was created; Refresh updates it after the backing grew.
	Size int64
	// Thin is whether tgt advertises thin provisioning (UNMAP punches
	// holes in the backing).
	Thin bool
}

// parseShow parses the output of `tgtadm --op show --mode target`:
//
//	Target 1: iqn.2026-12.io.stowage:t1
//	    System information:
//	    I_T nexus information:
//	        I_T nexus: 10
//	    LUN information:
//	        LUN: 1
//	            Size: 67 MB, Block size: 512
//	            Backing store path: /srv/a.img
//	    Account information:
//	        u1
//	    ACL information:
//	        127.0.0.1
//
// Sections are told apart by their headers at four spaces; a section's
// entries are at eight. Unknown sections and fields are ignored.
func parseShow(out string) ([]Target, error) {
	var (
		targets []Target
		cur     *Target
		lun     *LUN
		section string
	)
	flushLUN := func() {
		if lun != nil && cur != nil && lun.Number != 0 {
			cur.LUNs = append(cur.LUNs, *lun)
		}
		lun = nil
	}
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if strings.TrimSpace(line) == "" {
			continue
		}
		indent := len(line) - len(strings.TrimLeft(line, " "))
		text := strings.TrimSpace(line)
		bad := func(why string) error {
			return fmt.Errorf("tgtadm show output line %d %q: %s: %w", n, text, why, errdefs.ErrInternal)
		}
		switch {
		case indent == 0:
			flushLUN()
			rest, ok := strings.CutPrefix(text, "Target ")
			if !ok {
				return nil, bad("expected \"Target <tid>: <iqn>\"")
			}
			tid, iqn, ok := strings.Cut(rest, ": ")
			t, err := strconv.Atoi(tid)
			if !ok || err != nil || iqn == "" {
				return nil, bad("expected \"Target <tid>: <iqn>\"")
			}
			targets = append(targets, Target{TID: t, IQN: iqn})
			cur = &targets[len(targets)-1]
			section = ""
		case cur == nil:
			return nil, bad("field before the first target")
		case indent == 4:
			flushLUN()
			section = strings.TrimSuffix(text, ":")
		case section == "LUN information" && indent == 8:
			flushLUN()
			v, ok := strings.CutPrefix(text, "LUN: ")
			num, err := strconv.Atoi(v)
			if !ok || err != nil || num < 0 {
				return nil, bad("expected \"LUN: <n>\"")
			}
			lun = &LUN{Number: num}
		case section == "LUN information" && indent > 8:
			if lun == nil {
				return nil, bad("LUN field before \"LUN: <n>\"")
			}
			key, val, _ := strings.Cut(text, ":")
			val = strings.TrimSpace(val)
			switch key {
			case "Backing store path":
				if val != "None" {
					lun.Backing = val
				}
			case "Thin-provisioning":
				lun.Thin = val == "Yes"
			case "Size":
				// "67 MB, Block size: 512"
				mb, _, _ := strings.Cut(val, ",")
				num, ok := strings.CutSuffix(strings.TrimSpace(mb), " MB")
				v, err := strconv.ParseInt(num, 10, 64)
				if !ok || err != nil || v < 0 {
					return nil, bad("expected \"Size: <n> MB, ...\"")
				}
				lun.Size = v * 1000 * 1000
			}
		case section == "I_T nexus information" && indent == 8:
			if v, ok := strings.CutPrefix(text, "I_T nexus:"); ok {
				sid, err := strconv.Atoi(strings.TrimSpace(v))
				if err != nil || sid < 0 {
					return nil, bad("expected \"I_T nexus: <sid>\"")
				}
				cur.Sessions++
				cur.Nexuses = append(cur.Nexuses, Nexus{SID: sid})
			}
		case section == "I_T nexus information" && indent > 8 && len(cur.Nexuses) > 0:
			nx := &cur.Nexuses[len(cur.Nexuses)-1]
			switch {
			case strings.HasPrefix(text, "Initiator:"):
				// "Initiator: iqn.… alias: none"
				name, _, _ := strings.Cut(strings.TrimSpace(strings.TrimPrefix(text, "Initiator:")), " ")
				nx.Initiator = name
			case strings.HasPrefix(text, "Connection:"):
				cid, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(text, "Connection:")))
				if err != nil || cid < 0 {
					return nil, bad("expected \"Connection: <cid>\"")
				}
				nx.CIDs = append(nx.CIDs, cid)
			}
		case section == "Account information" && indent == 8:
			// Outgoing accounts print as "<user> (outgoing)".
			if !strings.HasSuffix(text, "(outgoing)") {
				cur.Accounts = append(cur.Accounts, text)
			}
		case section == "ACL information" && indent == 8:
			cur.ACLs = append(cur.ACLs, text)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading tgtadm show output: %w", err)
	}
	flushLUN()
	return targets, nil
}
