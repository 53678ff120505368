package harness

import (
	"net"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/xesp/xesp/bench/benchnet"
	"github.com/xesp/xesp/lab/netns"
)

// topo is bench/benchnet's phone ─ gw ─ core topology (shared with the
// gateway package's go test benchmarks) under the names the harness uses.
type topo struct {
	net             *benchnet.Topo
	phone, gw, core *netns.NS
	ph, pub         end
	priv, co        end
}

type end struct {
	ns    *netns.NS
	name  string
	index int
	mac   net.HardwareAddr
}

func newTopo() (*topo, error) {
	n, err := benchnet.New("xb")
	if err != nil {
		return nil, err
	}
	e := func(b benchnet.End) end { return end{ns: b.NS, name: b.Name, index: b.Index, mac: b.MAC} }
	return &topo{net: n, phone: n.Phone, gw: n.GW, core: n.Core,
		ph: e(n.Ph), pub: e(n.Pub), priv: e(n.Priv), co: e(n.Co)}, nil
}

// close removes the namespaces (and with them the veths).
func (tp *topo) close() error { return tp.net.Close() }

// attach attaches prog to e in driver mode.
func attach(e end, prog *ebpf.Program) (link.Link, error) {
	return benchnet.Attach(benchnet.End{NS: e.ns, Name: e.name, Index: e.index, MAC: e.mac}, prog)
}

// pinProcess pins every thread of the process to cpu and returns the undo.
func pinProcess(cpu int) (func(), error) { return benchnet.PinProcess(cpu) }
