package sa

import (
	"strings"
	"unsafe"
)

// fastSpec decodes one SA object the way encoding/json would, for the
// plain form SA files and batch requests nearly always have: known field
// names spelled exactly, strings of printable ASCII without escapes,
// integers as plain digits, no nulls, no repeated fields. Anything else
// returns false, and the caller decodes the item with encoding/json,
// which then also words the error. A million-phone file spent most of
// its parse in encoding/json's reflection; this path does no reflection
// and allocates only the strings the SA keeps (name, pair): the other
// strings point into b and live no longer than the Spec.
//
// scratch, when set, holds the encap and inner objects and the ports sp
// points at (reused for every item a parse goroutine decodes: the SA
// copies their values and keeps none of them); nil allocates them.
func fastSpec(b []byte, sp *Spec, scratch *specScratch) bool {
	d := fastDec{b: b, scratch: scratch}
	if !d.object(func(key string) bool { return d.specField(key, sp) }) {
		return false
	}
	d.ws()
	return d.i == len(d.b)
}

type fastDec struct {
	b       []byte
	i       int
	seen    uint64 // fields set, one bit per field of the object being read
	scratch *specScratch
}

// specScratch is the storage of a Spec's optional objects, reused from
// one item to the next (fastSpec).
type specScratch struct {
	encap EncapSpec
	inner InnerSpec
	ports [2]uint16
}

func (d *fastDec) ws() {
	for d.i < len(d.b) {
		switch d.b[d.i] {
		case ' ', '\t', '\n', '\r':
			d.i++
		default:
			return
		}
	}
}

// object reads {"key": value, ...}, calling field for each key with the
// decoder at the value.
func (d *fastDec) object(field func(key string) bool) bool {
	d.ws()
	if d.i >= len(d.b) || d.b[d.i] != '{' {
		return false
	}
	d.i++
	d.ws()
	if d.i < len(d.b) && d.b[d.i] == '}' {
		d.i++
		return true
	}
	for {
		d.ws()
		key, ok := d.str()
		if !ok {
			return false
		}
		d.ws()
		if d.i >= len(d.b) || d.b[d.i] != ':' {
			return false
		}
		d.i++
		d.ws()
		if !field(key) {
			return false
		}
		d.ws()
		if d.i >= len(d.b) {
			return false
		}
		switch d.b[d.i] {
		case ',':
			d.i++
		case '}':
			d.i++
			return true
		default:
			return false
		}
	}
}

// str reads a string of printable ASCII without escapes, as a view of b.
func (d *fastDec) str() (string, bool) {
	if d.i >= len(d.b) || d.b[d.i] != '"' {
		return "", false
	}
	start := d.i + 1
	for j := start; j < len(d.b); j++ {
		c := d.b[j]
		if c == '"' {
			d.i = j + 1
			return unsafe.String(unsafe.SliceData(d.b[start:]), j-start), true
		}
		if c < 0x20 || c > 0x7e || c == '\\' {
			return "", false
		}
	}
	return "", false
}

// uint reads a JSON integer that fits in bits.
func (d *fastDec) uint(bits int) (uint64, bool) {
	start := d.i
	var n uint64
	for d.i < len(d.b) && d.b[d.i] >= '0' && d.b[d.i] <= '9' {
		if n > (1<<bits-1)/10 {
			return 0, false
		}
		n = n*10 + uint64(d.b[d.i]-'0')
		d.i++
	}
	digits := d.i - start
	if digits == 0 || digits > 1 && d.b[start] == '0' || n > 1<<bits-1 {
		return 0, false
	}
	// A fraction or exponent is a number json would refuse for an integer.
	if d.i < len(d.b) && (d.b[d.i] == '.' || d.b[d.i] == 'e' || d.b[d.i] == 'E') {
		return 0, false
	}
	return n, true
}

// once marks field bit as set; a repeated field goes to encoding/json.
func (d *fastDec) once(bit uint) bool {
	if d.seen&(1<<bit) != 0 {
		return false
	}
	d.seen |= 1 << bit
	return true
}

func (d *fastDec) strField(bit uint, dst *string) bool {
	if !d.once(bit) {
		return false
	}
	s, ok := d.str()
	*dst = s
	return ok
}

func (d *fastDec) specField(key string, sp *Spec) bool {
	switch key {
	case "name":
		if !d.strField(0, &sp.Name) {
			return false
		}
		sp.Name = strings.Clone(sp.Name) // the SA keeps it
		return true
	case "pair":
		if !d.strField(1, &sp.Pair) {
			return false
		}
		sp.Pair = strings.Clone(sp.Pair)
		return true
	case "spi":
		if !d.once(2) || d.i >= len(d.b) {
			return false
		}
		if d.b[d.i] == '"' {
			s, ok := d.str()
			sp.SPI = parseSPIText(s, true)
			if sp.SPI.raw != "" {
				sp.SPI.raw = strings.Clone(sp.SPI.raw)
			}
			return ok
		}
		start := d.i
		for d.i < len(d.b) && d.b[d.i] >= '0' && d.b[d.i] <= '9' {
			d.i++
		}
		if d.i == start || d.i-start > 1 && d.b[start] == '0' || d.i < len(d.b) && (d.b[d.i] == '.' || d.b[d.i] == 'e' || d.b[d.i] == 'E') {
			return false
		}
		sp.SPI = parseSPIText(string(d.b[start:d.i]), false)
		return true
	case "direction":
		return d.strField(3, &sp.Direction)
	case "mode":
		return d.strField(4, &sp.Mode)
	case "proposal":
		return d.strField(5, &sp.Proposal)
	case "enc_key":
		return d.strField(6, &sp.EncKey)
	case "enc_key_file":
		return d.strField(7, &sp.EncKeyFile)
	case "auth_key":
		return d.strField(8, &sp.AuthKey)
	case "auth_key_file":
		return d.strField(9, &sp.AuthKeyFile)
	case "esn":
		if !d.once(10) {
			return false
		}
		switch {
		case strings.HasPrefix(unsafe.String(unsafe.SliceData(d.b[d.i:]), len(d.b)-d.i), "true"):
			sp.ESN, d.i = true, d.i+4
		case strings.HasPrefix(unsafe.String(unsafe.SliceData(d.b[d.i:]), len(d.b)-d.i), "false"):
			sp.ESN, d.i = false, d.i+5
		default:
			return false
		}
		return true
	case "replay_window":
		if !d.once(11) {
			return false
		}
		n, ok := d.uint(32)
		w := uint32(n)
		sp.ReplayWindow = &w
		return ok
	case "local":
		return d.strField(12, &sp.Local)
	case "peer":
		return d.strField(13, &sp.Peer)
	case "encap":
		if !d.once(14) {
			return false
		}
		e := &EncapSpec{}
		ports := new([2]uint16)
		if d.scratch != nil {
			d.scratch.encap = EncapSpec{}
			e, ports = &d.scratch.encap, &d.scratch.ports
		}
		sp.Encap = e
		var seen uint64
		return d.object(func(k string) bool {
			var p **uint16
			var v *uint16
			var bit uint64
			switch k {
			case "local_port":
				p, v, bit = &e.LocalPort, &ports[0], 1
			case "peer_port":
				p, v, bit = &e.PeerPort, &ports[1], 2
			default:
				return false
			}
			if seen&bit != 0 {
				return false
			}
			seen |= bit
			n, ok := d.uint(16)
			*v = uint16(n)
			*p = v
			return ok
		})
	case "inner":
		if !d.once(15) {
			return false
		}
		in := &InnerSpec{}
		if d.scratch != nil {
			d.scratch.inner = InnerSpec{}
			in = &d.scratch.inner
		}
		sp.Inner = in
		var seen uint64
		return d.object(func(k string) bool {
			var p *string
			var bit uint64
			switch k {
			case "local":
				p, bit = &in.Local, 1
			case "peer":
				p, bit = &in.Peer, 2
			case "core":
				p, bit = &in.Core, 4
			default:
				return false
			}
			if seen&bit != 0 {
				return false
			}
			seen |= bit
			s, ok := d.str()
			*p = s
			return ok
		})
	case "lifetime":
		if !d.once(16) {
			return false
		}
		l := &LifetimeSpec{}
		sp.Lifetime = l
		var seen uint64
		return d.object(func(k string) bool {
			var p *uint64
			var bit uint64
			switch k {
			case "soft_bytes":
				p, bit = &l.SoftBytes, 1
			case "hard_bytes":
				p, bit = &l.HardBytes, 2
			case "soft_packets":
				p, bit = &l.SoftPackets, 4
			case "hard_packets":
				p, bit = &l.HardPackets, 8
			case "soft_seconds":
				p, bit = &l.SoftSeconds, 16
			case "hard_seconds":
				p, bit = &l.HardSeconds, 32
			default:
				return false
			}
			if seen&bit != 0 {
				return false
			}
			seen |= bit
			n, ok := d.uint(64)
			*p = n
			return ok
		})
	case "ports":
		if !d.once(17) {
			return false
		}
		ps := &PortsSpec{}
		sp.Ports = ps
		var seen uint64
		return d.object(func(k string) bool {
			var bit uint64
			switch k {
			case "local", "peer":
				bit = 1
				if k == "peer" {
					bit = 2
				}
				if seen&bit != 0 {
					return false
				}
				seen |= bit
				n, ok := d.uint(16)
				if k == "local" {
					ps.Local = uint16(n)
				} else {
					ps.Peer = uint16(n)
				}
				return ok
			case "protocol":
				if seen&4 != 0 {
					return false
				}
				seen |= 4
				s, ok := d.str()
				ps.Protocol = s
				return ok
			}
			return false
		})
	case "dscp":
		if !d.once(18) {
			return false
		}
		n, ok := d.uint(8)
		v := uint8(n)
		sp.DSCP = &v
		return ok
	case "idle_timeout":
		if !d.once(19) {
			return false
		}
		n, ok := d.uint(64)
		sp.IdleTimeout = n
		return ok
	}
	return false
}
