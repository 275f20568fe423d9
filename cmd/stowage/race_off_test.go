//go:build !race

package main

// raceEnabled says the test binary runs with the race detector: the
// stowage binary the end-to-end tests start is then built with -race too.
const raceEnabled = false
