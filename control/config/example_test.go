package config

import "testing"

// The example shipped for operators must stay valid.
func TestExampleConfigLoads(t *testing.T) {
	c, err := Load("../../examples/xesp.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(c.SAList) != 2 || c.SAList[0].Name != "ue1-in" || len(c.SAList[0].EncKey) != 20 {
		t.Fatalf("example SAs: %v", c.SAList)
	}
}
