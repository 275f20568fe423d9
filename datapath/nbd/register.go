package nbd

import (
	"sync"

	"github.com/stowage/stowage/datapath/stream"
)

var registerOnce sync.Once

// Register adds the nbd:// and nbd+unix:// URL schemes to
// stream.OpenSource and stream.OpenSink. Call it once while wiring the
// binary; later calls do nothing.
func Register() {
	registerOnce.Do(func() {
		for _, scheme := range []string{"nbd", "nbd+unix"} {
			stream.RegisterSource(scheme, openStreamSource)
			stream.RegisterSink(scheme, openStreamSink)
		}
	})
}
