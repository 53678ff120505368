package maps

import (
	"fmt"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/xesp/xesp/bpf"
)

// Config is the single-entry config array.
type Config struct {
	m *ebpf.Map
}

// NewConfig wraps the config map.
func NewConfig(m *ebpf.Map) (*Config, error) {
	if err := check(m, "config", ebpf.Array, 4, uint32(unsafe.Sizeof(bpf.Config{}))); err != nil {
		return nil, err
	}
	return &Config{m: m}, nil
}

// Get returns the stored config as is (zero fields mean the defaults: NAT-T
// port 4500, one worker).
func (c *Config) Get() (bpf.Config, error) {
	var cfg bpf.Config
	if err := c.m.Lookup(uint32(0), &cfg); err != nil {
		return cfg, fmt.Errorf("config map: get: %w", err)
	}
	return cfg, nil
}

// Set replaces the config; the programs see it on their next packet.
func (c *Config) Set(cfg bpf.Config) error {
	if err := c.m.Put(uint32(0), cfg); err != nil {
		return fmt.Errorf("config map: set: %w", err)
	}
	return nil
}
