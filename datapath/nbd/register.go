package nbd

import (
	"crypto/tls"
	"sync"

	"github.com/stowage/stowage/datapath/stream"
)

var registerOnce, registerTLSOnce sync.Once

// Register adds the nbd:// and nbd+unix:// URL schemes to
// stream.OpenSource and stream.OpenSink. Call it once while wiring the
// binary; later calls do nothing.
func Register() {
	registerOnce.Do(func() {
		for _, scheme := range []string{"nbd", "nbd+unix"} {
			stream.RegisterSource(scheme, streamSource(ClientOptions{}))
			stream.RegisterSink(scheme, streamSink(ClientOptions{}))
		}
	})
}

// RegisterTLS adds the nbds:// and nbds+unix:// URL schemes to
// stream.OpenSource and stream.OpenSink, connecting with cfg
// (ClientOptions.TLS; a GetClientCertificate that rotates keeps working).
// Call it once while wiring the binary, when it has its certificates;
// later calls do nothing.
func RegisterTLS(cfg *tls.Config) {
	registerTLSOnce.Do(func() {
		opts := ClientOptions{TLS: cfg}
		for _, scheme := range []string{"nbds", "nbds+unix"} {
			stream.RegisterSource(scheme, streamSource(opts))
			stream.RegisterSink(scheme, streamSink(opts))
		}
	})
}
