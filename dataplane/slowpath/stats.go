package slowpath

import "sync/atomic"

// Counter names one slow-path outcome. The String values are stable: the
// metrics package exports them as label values.
type Counter int

// Outcomes of a datagram on the NAT-T socket, and of the IKE relay.
const (
	Keepalive   Counter = iota // single 0xFF byte (RFC 3948 2.3)
	IKERelayed                 // IKE datagram sent on to the IKE endpoint
	IKEDropped                 // IKE datagram with no endpoint configured, or the relay table full
	IKEReturned                // IKE endpoint's datagram sent back to the phone
	ESPInjected                // ESP datagram queued on its SA's worker
	NoSA                       // ESP datagram whose SPI no inbound SA has
	Runt                       // too short for ESP and not a keepalive or IKE
	InjectFull                 // the owning worker's inject queue was full
	RelayErrors                // relay socket could not be opened, written or read
	NumCounters
)

var counterNames = [NumCounters]string{
	Keepalive:   "keepalive",
	IKERelayed:  "ike_relayed",
	IKEDropped:  "ike_dropped",
	IKEReturned: "ike_returned",
	ESPInjected: "esp_injected",
	NoSA:        "no_sa",
	Runt:        "runt",
	InjectFull:  "inject_full",
	RelayErrors: "relay_errors",
}

func (c Counter) String() string {
	if c >= 0 && c < NumCounters {
		return counterNames[c]
	}
	return "unknown"
}

// Stats is a snapshot of the counters, indexed by Counter.
type Stats [NumCounters]uint64

type counters [NumCounters]atomic.Uint64

func (c *counters) snapshot() (s Stats) {
	for i := range c {
		s[i] = c[i].Load()
	}
	return s
}

// add folds a batch's local tally into the shared counters, one atomic
// per outcome seen rather than one per datagram.
func (c *counters) add(t *Stats) {
	for i, v := range t {
		if v != 0 {
			c[i].Add(v)
			t[i] = 0
		}
	}
}
