package pktgen

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// WriteSAFile writes the gateway's side of n pairs (SASpecs) as an SA
// file: a JSON list (.json) or JSON lines (.jsonl, one SA a line: what a
// provisioning system streams out for a million phones). Keys are
// inline: two million key files would cost the daemon two million opens
// at start. It writes in chunks, so a million pairs never sit in memory
// as one document.
func WriteSAFile(ctx context.Context, path string, n int, nw Net) (err error) {
	if err := checkN(n); err != nil {
		return err
	}
	lines := strings.HasSuffix(path, ".jsonl")
	if !lines && !strings.HasSuffix(path, ".json") {
		return fmt.Errorf("pktgen: SA file %s: want a .json or .jsonl file", path)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("write SA file: %w", err)
	}
	defer func() {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("write SA file: %w", cerr)
		}
	}()
	w := bufio.NewWriterSize(f, 1<<20)
	sep := []byte(",\n")
	if lines {
		sep = []byte("\n")
	} else {
		w.WriteString("[\n")
	}
	const chunk = 16384
	for lo := 0; lo < n; lo += chunk {
		if err := ctx.Err(); err != nil {
			return err // a signal stops a million-pair file within moments
		}
		specs, err := SASpecsRange(lo, min(n, lo+chunk), nw)
		if err != nil {
			return err
		}
		for i := range specs {
			b, err := json.Marshal(&specs[i])
			if err != nil {
				return fmt.Errorf("encode SAs: %w", err)
			}
			w.Write(b)
			if lines || lo+chunk < n || i < len(specs)-1 {
				w.Write(sep)
			}
		}
	}
	if !lines {
		w.WriteString("\n]\n")
	}
	if err := w.Flush(); err != nil {
		return fmt.Errorf("write SA file: %w", err)
	}
	return nil
}

// LoadPairs is the SA pair count the load benchmarks use: XESP_LOAD_PAIRS
// when set (1..MaxSAs, an error naming the variable otherwise), else def.
func LoadPairs(def int) (int, error) {
	v := os.Getenv("XESP_LOAD_PAIRS")
	if v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 || n > MaxSAs {
		return 0, fmt.Errorf("XESP_LOAD_PAIRS=%q: want 1..%d", v, MaxSAs)
	}
	return n, nil
}
