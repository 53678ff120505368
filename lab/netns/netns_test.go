package netns

import (
	"bytes"
	"net"
	"strings"
	"testing"
)

// A veth pair between two fresh namespaces carries a real UDP datagram, and
// Do puts Go sockets in the right namespace.
func TestVethCarriesUDP(t *testing.T) {
	a, b := ForTest(t, "nsa"), ForTest(t, "nsb")
	aIf, bIf := VethForTest(t, a, b)
	a.MustRun("ip", "addr", "add", "192.0.2.1/24", "dev", aIf)
	b.MustRun("ip", "addr", "add", "192.0.2.2/24", "dev", bIf)

	var srv *net.UDPConn
	if err := b.Do(func() (err error) {
		srv, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(192, 0, 2, 2), Port: 9999})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer srv.Close()

	var cli *net.UDPConn
	if err := a.Do(func() (err error) {
		cli, err = net.DialUDP("udp4", nil, &net.UDPAddr{IP: net.IPv4(192, 0, 2, 2), Port: 9999})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	want := []byte("hello from a")
	if _, err := cli.Write(want); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n, from, err := srv.ReadFromUDP(buf)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf[:n], want) || !from.IP.Equal(net.IPv4(192, 0, 2, 1)) {
		t.Fatalf("got %q from %v", buf[:n], from)
	}
	// The host namespace must not have seen the links.
	if ifs, _ := net.Interfaces(); len(ifs) > 0 {
		for _, i := range ifs {
			if i.Name == aIf || i.Name == bIf {
				t.Fatalf("veth %s leaked into the host namespace", i.Name)
			}
		}
	}
}

func TestNewRefusesExisting(t *testing.T) {
	a := ForTest(t, "nsd")
	if _, err := New(a.Name); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Fatalf("New(existing) = %v, want an 'exists' error", err)
	}
}
