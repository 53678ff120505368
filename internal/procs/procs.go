// Package procs gives every thread locked to a packet loop a Go P of its
// own, on top of the GOMAXPROCS the rest of the process runs with.
//
// Why: a packet loop is a goroutine locked to its OS thread that sleeps
// in poll(2) when its rings are empty. While it sleeps the runtime's
// sysmon hands its P to other goroutines. When poll returns, the thread
// needs a P again; if every P is busy (the other packet loops, the API,
// a config parse, GC workers), the locked thread parks on a futex and
// its goroutine waits in the global run queue until some running
// goroutine is preempted, which sysmon does after 10 ms. Measured on the
// 2-vCPU bench host with one worker (docs/benchmarking.md, "Latency"):
// stalls of 15 and 20 ms, ten a second, at half the no-drop rate, every
// one of them a thread woken by packets and then parked waiting for a P;
// p99 latency 19–23 ms and an NDR of 0.74 of the AF_XDP reflect ceiling.
// With a P per loop: p99 under 1 ms and 0.97 of the ceiling.
//
// GOMAXPROCS still bounds the goroutines that are not packet loops, so
// the operator's setting (or the runtime's default, NumCPU or the cgroup
// quota) keeps its meaning for them.
package procs

import (
	"runtime"
	"sync"
)

var (
	mu   sync.Mutex
	held int // Ps reserved by running loops
	base int // GOMAXPROCS before the first reservation
)

// Reserve adds one P to GOMAXPROCS for the calling packet loop; release
// gives it back when the loop ends, and restores the original setting
// when the last loop has ended. Release may be called more than once.
//
// Changing GOMAXPROCS stops the world briefly, so call Reserve when a
// loop starts, never per packet or per batch.
func Reserve() (release func()) {
	mu.Lock()
	if held == 0 {
		base = runtime.GOMAXPROCS(0)
	}
	held++
	runtime.GOMAXPROCS(base + held)
	mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			mu.Lock()
			defer mu.Unlock()
			held--
			runtime.GOMAXPROCS(base + held)
		})
	}
}

// Held is the number of Ps reserved by running loops.
func Held() int {
	mu.Lock()
	defer mu.Unlock()
	return held
}
