package agent

import (
	"context"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/hostops"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

var (
	staticOnce sync.Once
	staticCaps *stowagev1.HostCapabilities
)

// capabilities reports what this host can do and what it sees of the stores
// the controller assigned to it. Facts that cannot change while the process
// runs are probed once.
func (a *Agent) capabilities(ctx context.Context) *stowagev1.HostCapabilities {
	staticOnce.Do(func() { staticCaps = probeStatic(ctx) })
	caps := &stowagev1.HostCapabilities{
		QemuImgVersion:  staticCaps.QemuImgVersion,
		Fuse:            staticCaps.Fuse,
		FusePassthrough: staticCaps.FusePassthrough,
		NbdKernel:       staticCaps.NbdKernel,
		IscsiInitiator:  staticCaps.IscsiInitiator && a.host.connector != nil,
		IscsiUserspace:  staticCaps.IscsiUserspace && a.host.lunIO != nil,
		IscsiTarget:     a.host.luns != nil,
		RbdExport:       staticCaps.RbdExport && a.cfg.NBDListen != "",
		Kernel:          staticCaps.Kernel,
		AgentVersion:    a.cfg.Version,
		TemplateCache:   a.cacheStatus(ctx),
	}
	a.mu.Lock()
	stores := a.stores
	a.mu.Unlock()
	caps.Stores = a.probeStores(ctx, stores)
	return caps
}

// probeStores probes the stores the controller assigned to this host and
// reports what it sees. A store whose directory passes the RootPolicy and
// carries the store's marker is served from then on (LocalHost.ProbeStore);
// any other is reported with its error and not served. Stores without a
// directory on the host (providers that are not drivers.HostRooted, such as
// S3) are not probed here: their drivers know how they are reached.
func (a *Agent) probeStores(ctx context.Context, stores []*stowagev1.StoreAssignment) []*stowagev1.StoreOnHost {
	var out []*stowagev1.StoreOnHost
	for _, s := range stores {
		if s.GetPath() == "" {
			continue
		}
		st := &stowagev1.StoreOnHost{StoreId: s.GetStoreId(), Path: s.GetPath()}
		p, err := a.host.ProbeStore(ctx, hostops.StoreRoot{ID: s.GetStoreId(), Path: s.GetPath()})
		if err != nil {
			st.Error = err.Error()
		} else {
			st.Reflink, st.CapacityBytes, st.AvailableBytes, st.FsType = p.Reflink, p.CapacityBytes, p.AvailableBytes, p.FSType
		}
		out = append(out, st)
	}
	return out
}

func probeStatic(ctx context.Context) *stowagev1.HostCapabilities {
	caps := &stowagev1.HostCapabilities{}
	if v, err := qemuimg.Version(ctx); err == nil {
		caps.QemuImgVersion = v
	}
	_, err := os.Stat("/dev/fuse")
	caps.Fuse = err == nil
	var uts unix.Utsname
	if unix.Uname(&uts) == nil {
		caps.Kernel = unix.ByteSliceToString(uts.Release[:])
	}
	// FUSE passthrough arrived in Linux 6.9.
	caps.FusePassthrough = caps.Fuse && kernelAtLeast(caps.Kernel, 6, 9)
	_, err = os.Stat("/sys/module/nbd")
	caps.NbdKernel = err == nil
	_, errTCP := os.Stat("/sys/module/iscsi_tcp")
	_, errAdm := exec.LookPath("iscsiadm")
	caps.IscsiInitiator = errTCP == nil && errAdm == nil
	formats := qemuFormats(ctx)
	caps.IscsiUserspace = formats["iscsi"]
	caps.RbdExport = formats["rbd"]
	return caps
}

func kernelAtLeast(release string, major, minor int) bool {
	var ma, mi int
	parts := strings.SplitN(release, ".", 3)
	if len(parts) < 2 {
		return false
	}
	ma, err1 := strconv.Atoi(parts[0])
	mi, err2 := strconv.Atoi(strings.TrimFunc(parts[1], func(r rune) bool { return r < '0' || r > '9' }))
	if err1 != nil || err2 != nil {
		return false
	}
	return ma > major || (ma == major && mi >= minor)
}

// ReadIQN returns the host's iSCSI initiator name from open-iscsi's config, or "".
func ReadIQN() string {
	b, err := os.ReadFile("/etc/iscsi/initiatorname.iscsi")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "InitiatorName="); ok {
			return v
		}
	}
	return ""
}

// qemuFormats are the block drivers qemu-img lists as supported, modules
// included (iscsi: libiscsi, rbd: librbd; Debian's qemu-block-extra).
func qemuFormats(ctx context.Context) map[string]bool {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "qemu-img", "--help").Output()
	if err != nil {
		return nil
	}
	_, formats, _ := strings.Cut(string(out), "Supported formats:")
	have := map[string]bool{}
	for _, f := range strings.Fields(formats) {
		have[f] = true
	}
	return have
}
