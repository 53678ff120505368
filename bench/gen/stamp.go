package gen

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/xesp/xesp/lab/xdptest"
)

// Stamp is one sampled arrival at a stamping Counter: the receive time
// (bpf_ktime_get_ns, CLOCK_MONOTONIC, taken in the far end's XDP program)
// and the start of the IP packet (Len bytes long; Data may hold fewer).
type Stamp struct {
	Ns   uint64
	Len  int
	Data []byte // valid only inside the ReadStamps callback
}

// StampMax is the most bytes of a packet a stamp carries.
const StampMax = xdptest.StampMax

// NewStampCounter is NewCounter whose program can also sample arrivals
// into a ring buffer of ringBytes (a power of two) for a latency receiver
// (StartStamps, ReadStamps). Sampling is off until StartStamps: off, the
// program costs one load and a branch more than NewCounter's.
func NewStampCounter(port uint16, ringBytes int) (*Counter, error) {
	st, err := xdptest.CountStamped(port, ringBytes)
	if err != nil {
		return nil, fmt.Errorf("gen: %w", err)
	}
	rd, err := ringbuf.NewReader(st.Stamps)
	if err != nil {
		st.Close()
		return nil, fmt.Errorf("gen: stamp reader: %w", err)
	}
	return &Counter{Prog: st.Prog, m: st.Counts, st: st, rd: rd}, nil
}

// StartStamps samples every arrival whose per-CPU count & mask is 0 (mask
// 2^k−1: one in 2^k), recording its first maxLen bytes (at most StampMax)
// from the IP header: 44 covers the cleartext marker, a whole ESP packet
// is needed to open it.
func (c *Counter) StartStamps(mask uint64, maxLen int) error {
	if c.st == nil {
		return errors.New("gen: counter has no stamps (NewStampCounter)")
	}
	if maxLen < 1 || maxLen > StampMax {
		return fmt.Errorf("gen: stamp length %d outside 1..%d", maxLen, StampMax)
	}
	if err := c.st.Len.Set(uint32(maxLen)); err != nil {
		return fmt.Errorf("gen: set stamp length: %w", err)
	}
	if err := c.st.Mask.Set(mask); err != nil {
		return fmt.Errorf("gen: set stamp mask: %w", err)
	}
	if err := c.st.On.Set(uint32(1)); err != nil {
		return fmt.Errorf("gen: start stamps: %w", err)
	}
	return nil
}

// StopStamps stops sampling.
func (c *Counter) StopStamps() error {
	if c.st == nil {
		return nil
	}
	if err := c.st.On.Set(uint32(0)); err != nil {
		return fmt.Errorf("gen: stop stamps: %w", err)
	}
	return nil
}

// ReadStamps drains the stamps recorded so far into fn and returns how
// many it read and how many the ring buffer had no room for (since the
// counter was loaded).
func (c *Counter) ReadStamps(fn func(Stamp)) (n int, lost uint64, err error) {
	if c.st == nil {
		return 0, 0, errors.New("gen: counter has no stamps (NewStampCounter)")
	}
	// Records already committed are read without waiting; the deadline
	// only guards against blocking on a record still being written.
	c.rd.SetDeadline(time.Now().Add(100 * time.Millisecond))
	var rec ringbuf.Record
	for c.rd.AvailableBytes() > 0 {
		if err := c.rd.ReadInto(&rec); err != nil {
			return n, 0, fmt.Errorf("gen: read stamps: %w", err)
		}
		s := rec.RawSample
		if len(s) < xdptest.StampHeader {
			continue
		}
		fn(Stamp{Ns: binary.NativeEndian.Uint64(s), Len: int(binary.NativeEndian.Uint32(s[8:])), Data: s[xdptest.StampHeader:]})
		n++
	}
	if err := c.st.Lost.Get(&lost); err != nil {
		return n, 0, fmt.Errorf("gen: read lost stamps: %w", err)
	}
	return n, lost, nil
}
