package topo

import (
	"bufio"
	"fmt"
	"os"
	"strings"
	"syscall"
	"time"
)

// Capture runs tcpdump on the public segment at the gateway's port (the
// inet namespace's "gw", which carries every NAPT's traffic with the
// gateway) writing ESP in UDP 4500 to file, and returns a function that
// stops it and waits for the file to be complete. Immediate mode matters:
// without it packets still in the capture ring's open block when tcpdump
// is stopped are lost (it reported "received by filter", none captured).
// The kernel buffer is 32 MiB, not tcpdump's 2: on a loaded 2-vCPU CI
// host a burst of 50 phones registering at once outran a slow tcpdump
// and one reply was missing from the capture, though the phone had it.
// Should the kernel still drop any, stop says so: the capture's figures
// are then incomplete, which is not the gateway's loss.
func (l *Lab) Capture(file string) (stop func() error, err error) {
	cmd := l.Inet.Command("tcpdump", "-i", "gw", "-B", "32768", "-U", "--immediate-mode", "-n", "-s", "0", "-w", file, "udp", "port", "4500")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("tcpdump: %w", err)
	}
	// tcpdump says "listening on" once the capture is armed.
	ready := make(chan error, 1)
	var head strings.Builder
	// tail is what tcpdump says after it listens: its statistics at exit.
	var tail strings.Builder
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			head.WriteString(sc.Text() + "\n")
			if strings.Contains(sc.Text(), "listening on") {
				ready <- nil
				for sc.Scan() {
					tail.WriteString(sc.Text() + "\n")
				}
				return
			}
		}
		ready <- fmt.Errorf("tcpdump exited: %s", head.String())
	}()
	select {
	case err := <-ready:
		if err != nil {
			cmd.Wait()
			return nil, err
		}
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		cmd.Wait()
		return nil, fmt.Errorf("tcpdump not listening after 10 s")
	}
	return func() error {
		// The last packets may still be on their way through the ring:
		// tcpdump writes each one as it reads it (-U, immediate mode),
		// so wait until the file stopped growing for 500 ms. A tcpdump
		// lagging behind on a loaded machine is still writing; a fixed
		// pause would cut it off.
		waitQuiet(file, 500*time.Millisecond, 15*time.Second)
		cmd.Process.Signal(syscall.SIGINT)
		<-done
		if err := cmd.Wait(); err != nil {
			return fmt.Errorf("tcpdump: %w", err)
		}
		var dropped int
		for _, line := range strings.Split(tail.String(), "\n") {
			if _, err := fmt.Sscanf(strings.TrimSpace(line), "%d packets dropped by kernel", &dropped); err == nil && dropped > 0 {
				return fmt.Errorf("tcpdump: %d packets dropped by kernel: the capture is incomplete (%s)", dropped, strings.TrimSpace(tail.String()))
			}
		}
		return nil
	}, nil
}

// waitQuiet returns once file's size has not changed for quiet, or after
// max.
func waitQuiet(file string, quiet, max time.Duration) {
	size := int64(-1)
	since := time.Now()
	for end := time.Now().Add(max); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		st, err := os.Stat(file)
		if err != nil {
			continue
		}
		if st.Size() != size {
			size, since = st.Size(), time.Now()
		} else if time.Since(since) >= quiet {
			return
		}
	}
}

// TsharkArgs are tshark's arguments to read file with every SA of the lab
// in Wireshark's ESP SA table (keys as key||salt, AES-GCM-16), ESP
// decryption on, and UDP 4500 decoded as RFC 3948 encapsulation (its
// default port), followed by extra.
func (l *Lab) TsharkArgs(file string, extra ...string) []string {
	args := []string{"-r", file, "-n", "-o", "esp.enable_encryption_decode:TRUE"}
	for _, s := range l.Config.SAList {
		args = append(args, "-o", fmt.Sprintf(`uat:esp_sa:"IPv4","*","*","0x%08x","AES-GCM with 16 octet ICV [RFC4106]","0x%x","NULL",""`, s.SPI, []byte(s.EncKey)))
	}
	return append(args, extra...)
}
