package harness

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"html"
	"io"
	"math"
	"os"
	"runtime"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// Machine is where a report was measured.
type Machine struct {
	CPU    string `json:"cpu"`
	Cores  int    `json:"cores"`
	Kernel string `json:"kernel"`
	Go     string `json:"go"`
	MemGiB int    `json:"mem_gib"`
}

// ReadMachine reads /proc/cpuinfo, uname and sysinfo.
func ReadMachine() Machine {
	m := Machine{Cores: runtime.NumCPU(), Go: runtime.Version()}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	var si unix.Sysinfo_t
	if unix.Sysinfo(&si) == nil {
		m.MemGiB = int(uint64(si.Totalram) * uint64(si.Unit) >> 30)
	}
	return m
}

func (r *Report) pps(name string) float64 {
	if x, ok := r.Find(name); ok {
		return x.PPS
	}
	return 0
}

// ratios fills each xesp and baseline result's ratios to the ceilings of
// its size measured in this run, and xesp's to 1 SA and to the sockets.
func (r *Report) ratios() {
	minSAs := 0
	for _, x := range r.Results {
		if x.Group == "xesp" && (minSAs == 0 || x.SAs < minSAs) {
			minSAs = x.SAs
		}
	}
	for i := range r.Results {
		x := &r.Results[i]
		if x.Group == "ceiling" {
			continue
		}
		x.Ratios = map[string]float64{}
		put := func(key, ceiling string) float64 {
			if c := r.pps(ceiling); c > 0 {
				x.Ratios[key] = x.PPS / c
				return c
			}
			return 0
		}
		link, aead := "public", "aead_open"
		switch x.Dir {
		case "encap":
			link, aead = "private", "aead_seal"
		}
		// The ceiling that shares xesp's bottleneck: AF_XDP RX → TX in
		// copy mode on the link the direction receives on.
		put("afxdp_reflect", ceilingName("afxdp_reflect", link, x.Size))
		if c, ok := r.Find(ceilingName("afxdp_reflect", link, x.Size)); ok {
			if c.NDR > 0 && x.Trials > 0 {
				x.Ratios["ndr_reflect"] = x.NDR / c.NDR
			}
			if c.PDR > 0 && x.Trials > 0 {
				x.Ratios["pdr_reflect"] = x.PDR / c.PDR
			}
		}
		rx := put("afxdp_rx", ceilingName("afxdp_rx", link, x.Size))
		put("xdp_drop", ceilingName("xdp_drop", link, x.Size))
		ae := put("aead", ceilingName(aead, "", x.Size))
		if x.Dir != "both" && rx > 0 && ae > 0 {
			x.Ratios["min_ceiling"] = x.PPS / min(rx, ae)
		}
		if x.Group == "xesp" {
			if one := r.pps(xespName(x.Test, x.Size, minSAs, x.Workers)); one > 0 && x.SAs != minSAs {
				x.Ratios["vs_min_sas"] = x.PPS / one
			}
			if x.Dir != "both" {
				if b := r.pps(baselineName(x.Dir, x.Size, x.SAs)); b > 0 {
					x.Ratios["vs_sockets"] = x.PPS / b
				}
			}
		}
		if x.Group == "flood" {
			if b := r.pps(xespName("decap", x.Size, x.SAs, x.Workers)); b > 0 {
				x.Ratios["vs_no_flood"] = x.PPS / b
			}
		}
		if len(x.Ratios) == 0 {
			x.Ratios = nil
		}
	}
}

// targets evaluates issue 13's goals on this run, one worker: decap and
// encap against the AF_XDP reflect ceiling of the same link and size
// (saturation; NDR too when searched) at the fewest SAs, the most SAs
// against the fewest, xesp against the UDP-socket baseline at every SA
// count, and decap under a forged flood against decap without (issue 18).
func (r *Report) targets() {
	for _, dir := range []string{"decap", "encap"} {
		var sas []int
		sizes := map[string]bool{}
		for _, x := range r.Results {
			if x.Group == "xesp" && x.Test == dir && x.Workers == 1 {
				if !slices.Contains(sas, x.SAs) {
					sas = append(sas, x.SAs)
				}
				sizes[x.Size] = true
			}
		}
		if len(sas) == 0 {
			continue
		}
		lo, hi := slices.Min(sas), slices.Max(sas)
		for _, size := range []string{"200", "imix"} {
			if !sizes[size] {
				continue
			}
			base, _ := r.Find(xespName(dir, size, lo, 1))
			link := "public"
			if dir == "encap" {
				link = "private"
			}
			if v, ok := base.Ratios["afxdp_reflect"]; ok {
				r.Targets = append(r.Targets, Target{Name: fmt.Sprintf("%s %s, %s, saturation vs AF_XDP reflect", dir, size, saLabel(lo)), Ratio: v, Goal: 0.85, Met: v >= 0.85,
					How: fmt.Sprintf("%s / %s", base.Name, ceilingName("afxdp_reflect", link, size))})
			}
			if v, ok := base.Ratios["ndr_reflect"]; ok {
				r.Targets = append(r.Targets, Target{Name: fmt.Sprintf("%s %s, %s, NDR vs AF_XDP reflect NDR", dir, size, saLabel(lo)), Ratio: v, Goal: 0.85, Met: v >= 0.85,
					How: fmt.Sprintf("NDR of %s / NDR of %s", base.Name, ceilingName("afxdp_reflect", link, size))})
			}
			if dir == "decap" {
				if f, ok := r.Find(floodName(size, lo, 1)); ok {
					if v, ok := f.Ratios["vs_no_flood"]; ok {
						r.Targets = append(r.Targets, Target{Name: fmt.Sprintf("decap %s, %s, under a forged flood of one SA vs without", size, saLabel(lo)), Ratio: v, Goal: 0.90, Met: v >= 0.90,
							How: fmt.Sprintf("%s / %s", f.Name, base.Name)})
					}
				}
			}
			if hi != lo {
				big, _ := r.Find(xespName(dir, size, hi, 1))
				if v, ok := big.Ratios["vs_min_sas"]; ok {
					r.Targets = append(r.Targets, Target{Name: fmt.Sprintf("%s %s, %s vs %s", dir, size, saLabel(hi), saLabel(lo)), Ratio: v, Goal: 0.90, Met: v >= 0.90,
						How: fmt.Sprintf("%s / %s", big.Name, base.Name)})
				}
			}
			for _, n := range sas {
				x, _ := r.Find(xespName(dir, size, n, 1))
				if v, ok := x.Ratios["vs_sockets"]; ok {
					r.Targets = append(r.Targets, Target{Name: fmt.Sprintf("%s %s, %s vs the UDP-socket baseline", dir, size, saLabel(n)), Ratio: v, Goal: 2.5, Met: v >= 2.5,
						How: fmt.Sprintf("%s / %s", x.Name, baselineName(dir, size, n))})
				}
			}
		}
	}
}

// WriteJSON writes the report.
func (r *Report) WriteJSON(w io.Writer) error {
	e := json.NewEncoder(w)
	e.SetEscapeHTML(false)
	e.SetIndent("", "  ")
	return e.Encode(r)
}

func mpps(v float64) string {
	if v == 0 {
		return "–"
	}
	return fmt.Sprintf("%.3f", v/1e6)
}

func ratio(m map[string]float64, k string) string {
	if v, ok := m[k]; ok {
		return fmt.Sprintf("%.2f", v)
	}
	return ""
}

// Markdown writes the machine, the targets and one table row per result.
func (r *Report) Markdown(w io.Writer) {
	if r.Pairs > 0 {
		r.gateMarkdown(w)
		return
	}
	fmt.Fprintf(w, "Measured %s on %s, %d cores, kernel %s, %s; generator on CPU %d, gateway on CPU %d; %d rounds of %d frames per scenario",
		r.Started.Format("2006-01-02 15:04 UTC"), r.Machine.CPU, r.Machine.Cores, r.Machine.Kernel, r.Machine.Go, r.GenCPU, r.GwCPU, r.Rounds, r.Ring)
	if r.Repeat > 1 {
		fmt.Fprintf(w, ", everything repeated %d times (medians; ratios taken within a repetition)", r.Repeat)
	}
	fmt.Fprintf(w, " (%.0f s in all). Mpps delivered counts what reached the far end (decap: decrypted and forwarded to the core); loss is 1 − delivered/offered over all rounds.\n\n", r.Seconds)
	if len(r.Targets) > 0 {
		fmt.Fprintln(w, "| Target | Ratio | Goal | Met | Computed as |\n|---|---:|---:|:-:|---|")
		for _, t := range r.Targets {
			met := "no"
			if t.Met {
				met = "yes"
			}
			fmt.Fprintf(w, "| %s | %.2f | %.2f | %s | `%s` |\n", t.Name, t.Ratio, t.Goal, met, t.How)
		}
		fmt.Fprintln(w)
	}
	hasNDR := false
	for _, x := range r.Results {
		hasNDR = hasNDR || x.Trials > 0
	}
	if hasNDR {
		fmt.Fprintln(w, "NDR/PDR: highest paced offered rate with no loss / with ≤ 0.5% loss (MLRsearch-style search, docs/benchmarking.md); saturation: delivered rate when offered the live-frames burst. Ratios to the AF_XDP reflect ceiling of the same link and size (same bottleneck: RX → TX in copy mode), the AEAD rate beside.")
		fmt.Fprintln(w)
		fmt.Fprintln(w, "| Scenario | NDR Mpps | PDR Mpps | saturation Mpps | NDR ÷ reflect NDR | PDR ÷ reflect PDR | sat ÷ reflect | sat ÷ AEAD | ÷ fewest SAs (sat) | ÷ sockets (sat) | trials |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
		for _, x := range r.Results {
			if x.Trials == 0 && x.Test != "udp_sockets" && x.Test != "aead_open" && x.Test != "aead_seal" {
				continue
			}
			ndr, pdr := mpps(x.NDR), mpps(x.PDR)
			if x.SenderBound {
				ndr, pdr = "≥ "+ndr+" (sender)", "≥ "+pdr+" (sender)"
			}
			fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %d |\n", x.Name, ndr, pdr, mpps(x.PPS),
				ratio(x.Ratios, "ndr_reflect"), ratio(x.Ratios, "pdr_reflect"), ratio(x.Ratios, "afxdp_reflect"), ratio(x.Ratios, "aead"),
				ratio(x.Ratios, "vs_min_sas"), ratio(x.Ratios, "vs_sockets"), x.Trials)
		}
		fmt.Fprintln(w)
	}
	hasLat := false
	for _, x := range r.Results {
		hasLat = hasLat || len(x.Latency) > 0
	}
	if hasLat {
		fmt.Fprintln(w, "Latency at 50% and 90% of NDR (docs/benchmarking.md, Latency): one 1 s paced trial each; send time recorded per frame by the paced AF_XDP sender, arrival stamped with bpf_ktime_get_ns by the far end's XDP counter, matched by the serial number the payload carries (inside the ESP encryption for decap); exact percentiles of a sample of the arrivals. \"(sender)\": the NDR was the sender's top rate, so the fraction is of that rate. The reflect ceiling's row stands beside xesp's of the same link.")
		fmt.Fprintln(w)
		fmt.Fprintln(w, "| Scenario | of NDR | offered kpps | loss | p50 µs | p99 µs | p99.9 µs | max µs | samples | p99 ÷ reflect p99 | run-queue wait ms | load |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
		for _, x := range r.Results {
			for _, l := range x.Latency {
				of := fmt.Sprintf("%.0f%%", 100*l.OfNDR)
				if l.SenderBound {
					of += " (sender)"
				}
				vs := "–"
				if x.Group != "ceiling" {
					if c, ok := r.Find(ceilingName("afxdp_reflect", linkOf(x.Dir), x.Size)); ok {
						for _, cl := range c.Latency {
							if cl.OfNDR == l.OfNDR && cl.P99 > 0 {
								vs = fmt.Sprintf("%.2f", l.P99/cl.P99)
							}
						}
					}
				}
				fmt.Fprintf(w, "| %s | %s | %.1f | %.3f%% | %.1f | %.1f | %.1f | %.1f | %d | %s | %.1f | %.1f |\n", x.Name, of, l.Rate/1e3, l.LossPct,
					l.P50, l.P99, l.P999, l.Max, l.Samples, vs, l.RunqWaitMs, l.Load)
			}
		}
		fmt.Fprintln(w)
	}
	if r.Install != nil {
		r.Install.markdown(w)
	}
	if len(r.Loads) > 0 {
		fmt.Fprintln(w, "SA loads into the running gateway (SAD in chunks of 4096 pairs, until the workers and the XDP SA map hold them); heap: live Go heap added per SA after a collection — the bench process's, so it includes the generator's own SA state and the SAD's copy.")
		fmt.Fprintln(w)
		fmt.Fprintln(w, "| Workers | From pairs | To pairs | Seconds | Pairs/s | Heap B/SA | Heap after GiB |\n|---:|---:|---:|---:|---:|---:|---:|")
		for _, l := range r.Loads {
			fmt.Fprintf(w, "| %d | %d | %d | %.2f | %.0f | %.0f | %.2f |\n", l.Workers, l.From, l.To, l.Seconds, l.PairsPerSec, l.HeapPerSA, l.HeapAfterGiB)
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintln(w, "| Scenario | Mpps delivered | Mpps offered | Loss % | ÷ AF_XDP reflect | ÷ AF_XDP rx | ÷ AEAD | ÷ min ceiling | ÷ fewest SAs | ÷ sockets | ÷ no flood |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	for _, x := range r.Results {
		loss := fmt.Sprintf("%.1f", x.LossPct)
		if x.Offered == 0 {
			loss = ""
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", x.Name, mpps(x.PPS), mpps(x.OfferedPPS), loss,
			ratio(x.Ratios, "afxdp_reflect"), ratio(x.Ratios, "afxdp_rx"), ratio(x.Ratios, "aead"), ratio(x.Ratios, "min_ceiling"), ratio(x.Ratios, "vs_min_sas"), ratio(x.Ratios, "vs_sockets"),
			ratio(x.Ratios, "vs_no_flood"))
	}
	if len(r.Warnings) > 0 {
		fmt.Fprintln(w)
		for _, s := range r.Warnings {
			fmt.Fprintf(w, "- %s\n", s)
		}
	}
}

// SVG draws delivered packets/s per scenario as horizontal bars on a log
// scale, one panel per packet size, with that size's ceilings drawn in as
// vertical lines. Each bar is labelled with its loss when it lost more
// than 1%: a saturating run loses what the path cannot take.
func (r *Report) SVG(w io.Writer) {
	var sizes []string
	for _, x := range r.Results {
		if !slices.Contains(sizes, x.Size) {
			sizes = append(sizes, x.Size)
		}
	}
	const (
		left, right = 260, 40
		plotW       = 700
		rowH        = 16
		top         = 60
	)
	lo, hi := math.Inf(1), 1e4
	for _, x := range r.Results {
		if x.PPS > 0 {
			lo, hi = math.Min(lo, x.PPS), math.Max(hi, x.PPS)
		}
	}
	if math.IsInf(lo, 1) {
		lo = 1e4
	}
	lgLo, lgHi := math.Floor(math.Log10(lo*0.6)), math.Ceil(math.Log10(hi))
	if lgHi <= lgLo {
		lgHi = lgLo + 1
	}
	xOf := func(v float64) float64 {
		if v <= 0 {
			return left
		}
		return left + plotW*(math.Log10(v)-lgLo)/(lgHi-lgLo)
	}
	ceilColors := map[string]string{"xdp_drop": "#d62728", "afxdp_rx": "#ff7f0e", "afxdp_reflect": "#8c564b", "aead_open": "#2ca02c", "aead_seal": "#17becf"}
	barColors := map[string]string{"decap": "#1f77b4", "encap": "#9467bd", "both": "#e377c2", "udp_sockets": "#7f7f7f"}
	var body bytes.Buffer
	y := top
	for _, s := range sizes {
		var rows []Result
		var ceils []Result
		for _, x := range r.Results {
			if x.Size != s {
				continue
			}
			if x.Group == "ceiling" {
				ceils = append(ceils, x)
			} else {
				rows = append(rows, x)
			}
		}
		fmt.Fprintf(&body, `<text x="10" y="%d" font-weight="bold">%s B (inner IP packet)</text>`+"\n", y+12, html.EscapeString(s))
		y += 20
		y0 := y
		for _, x := range rows {
			c := barColors[x.Test]
			fmt.Fprintf(&body, `<text x="%d" y="%d" text-anchor="end" font-size="11">%s</text>`+"\n", left-6, y+11, html.EscapeString(strings.TrimPrefix(x.Name, "xesp/")))
			fmt.Fprintf(&body, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"/>`+"\n", left, y+2, xOf(x.PPS)-left, rowH-4, c)
			label := fmt.Sprintf("%.2f Mpps", x.PPS/1e6)
			if x.LossPct > 1 {
				label += fmt.Sprintf(" (loss %.0f%%)", x.LossPct)
			}
			fmt.Fprintf(&body, `<text x="%.1f" y="%d" font-size="10">%s</text>`+"\n", xOf(x.PPS)+4, y+11, label)
			y += rowH
		}
		if len(rows) == 0 {
			y += rowH
		}
		// Each ceiling's line runs through the panel into a label band
		// below it, one label per row so close ceilings stay readable.
		band := y
		for i, c := range ceils {
			xc := xOf(c.PPS)
			ly := band + 11*(i+1)
			fmt.Fprintf(&body, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" stroke-width="1.5" stroke-dasharray="5,3"/>`+"\n", xc, y0-2, xc, ly-3, ceilColors[c.Test])
			fmt.Fprintf(&body, `<text x="%.1f" y="%d" font-size="9" fill="%s" text-anchor="end">%s %.2fM</text>`+"\n",
				xc-3, ly, ceilColors[c.Test], html.EscapeString(strings.TrimPrefix(strings.TrimSuffix(c.Name, "/"+s), "ceiling/")), c.PPS/1e6)
		}
		y += 11 * len(ceils)
		y += 14
	}
	// Axis.
	var axis bytes.Buffer
	for e := lgLo; e <= lgHi; e++ {
		for _, m := range []float64{1, 2, 5} {
			v := m * math.Pow(10, e)
			if math.Log10(v) > lgHi+1e-9 {
				break
			}
			x := xOf(v)
			fmt.Fprintf(&axis, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/>`+"\n", x, top, x, y)
			fmt.Fprintf(&axis, `<text x="%.1f" y="%d" font-size="10" text-anchor="middle">%s</text>`+"\n", x, y+12, ppsLabel(v))
		}
	}
	var scaling bytes.Buffer
	sh := r.scalingSVG(&scaling, y+110)
	height := y + 70 + sh
	width := left + plotW + right + 60
	fmt.Fprintf(w, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`+"\n", width, height)
	fmt.Fprintf(w, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(w, `<text x="10" y="20" font-size="15" font-weight="bold">xesp: delivered packets/s by scenario (log scale), ceilings dashed</text>`+"\n")
	fmt.Fprintf(w, `<text x="10" y="38" font-size="11">%s</text>`+"\n", html.EscapeString(fmt.Sprintf("%s, %d cores, kernel %s; generator CPU %d, gateway CPU %d; %s",
		r.Machine.CPU, r.Machine.Cores, r.Machine.Kernel, r.GenCPU, r.GwCPU, r.Started.Format("2006-01-02 15:04 UTC"))))
	w.Write(axis.Bytes())
	w.Write(body.Bytes())
	// Legend.
	lx, ly := 10, y+30
	for _, k := range []string{"decap", "encap", "both", "udp_sockets"} {
		fmt.Fprintf(w, `<rect x="%d" y="%d" width="10" height="10" fill="%s"/><text x="%d" y="%d" font-size="11">%s</text>`+"\n", lx, ly, barColors[k], lx+14, ly+9, k)
		lx += 100
	}
	lx, ly = 10, ly+18
	for _, k := range []string{"xdp_drop", "afxdp_rx", "afxdp_reflect", "aead_open", "aead_seal"} {
		fmt.Fprintf(w, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2" stroke-dasharray="5,3"/><text x="%d" y="%d" font-size="11">%s</text>`+"\n", lx, ly+5, lx+20, ly+5, ceilColors[k], lx+24, ly+9, k)
		lx += 130
	}
	w.Write(scaling.Bytes())
	fmt.Fprintln(w, "</svg>")
}

// scalingSVG draws, from y0 down, one chart per packet size: xesp's
// saturation rate (solid) and NDR (dashed, when searched) against the SA
// count on log-log axes, decap and encap at one worker, with the AF_XDP
// reflect ceilings of that size as horizontal lines. It returns the
// height it used (0 when the run has fewer than two SA counts).
func (r *Report) scalingSVG(w *bytes.Buffer, y0 int) int {
	type pt struct{ sas, sat, ndr float64 }
	series := map[string][]pt{} // size/dir
	var sizes []string
	sasSet := map[int]bool{}
	lo, hi := math.Inf(1), 0.0
	for _, x := range r.Results {
		if x.Group != "xesp" || x.Workers != 1 || x.Dir == "both" || x.PPS <= 0 {
			continue
		}
		k := x.Size + "/" + x.Dir
		series[k] = append(series[k], pt{float64(x.SAs), x.PPS, x.NDR})
		if !slices.Contains(sizes, x.Size) {
			sizes = append(sizes, x.Size)
		}
		sasSet[x.SAs] = true
		lo, hi = math.Min(lo, x.PPS), math.Max(hi, x.PPS)
		if x.NDR > 0 {
			lo = math.Min(lo, x.NDR)
		}
	}
	if len(sasSet) < 2 {
		return 0
	}
	for _, x := range r.Results {
		if x.Test == "afxdp_reflect" && x.PPS > 0 {
			hi = math.Max(hi, x.PPS)
		}
	}
	var counts []int
	for n := range sasSet {
		counts = append(counts, n)
	}
	slices.Sort(counts)
	const left, plotW, plotH, gap = 80, 420, 180, 70
	lgX0, lgX1 := math.Log10(float64(counts[0])), math.Log10(float64(counts[len(counts)-1]))
	lgY0, lgY1 := math.Floor(math.Log10(lo*0.8)), math.Ceil(math.Log10(hi*1.2))
	colors := map[string]string{"decap": "#1f77b4", "encap": "#9467bd"}
	fmt.Fprintf(w, `<text x="10" y="%d" font-size="15" font-weight="bold">Packets/s vs SA count, per packet size (log-log): saturation solid, NDR dashed, AF_XDP reflect ceilings dotted</text>`+"\n", y0-20)
	for i, size := range sizes {
		ox, oy := left+i*(plotW+gap), y0
		xOf := func(n float64) float64 { return float64(ox) + plotW*(math.Log10(n)-lgX0)/math.Max(lgX1-lgX0, 1e-9) }
		yOf := func(v float64) float64 { return float64(oy) + plotH - plotH*(math.Log10(v)-lgY0)/(lgY1-lgY0) }
		fmt.Fprintf(w, `<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#999"/>`+"\n", ox, oy, plotW, plotH)
		fmt.Fprintf(w, `<text x="%d" y="%d" font-weight="bold">%s B</text>`+"\n", ox, oy-4, html.EscapeString(size))
		for _, n := range counts {
			fmt.Fprintf(w, `<text x="%.1f" y="%d" font-size="10" text-anchor="middle">%s</text>`+"\n", xOf(float64(n)), oy+plotH+12, saLabel(n))
		}
		for e := lgY0; e <= lgY1; e++ {
			fmt.Fprintf(w, `<text x="%d" y="%.1f" font-size="10" text-anchor="end">%s</text>`+"\n", ox-4, yOf(math.Pow(10, e))+3, ppsLabel(math.Pow(10, e)))
		}
		for _, dir := range []string{"decap", "encap"} {
			link := "public"
			if dir == "encap" {
				link = "private"
			}
			if c, ok := r.Find(ceilingName("afxdp_reflect", link, size)); ok && c.PPS > 0 {
				fmt.Fprintf(w, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="%s" stroke-dasharray="2,3"/>`+"\n", ox, yOf(c.PPS), ox+plotW, yOf(c.PPS), colors[dir])
			}
			pts := series[size+"/"+dir]
			slices.SortFunc(pts, func(a, b pt) int { return int(a.sas - b.sas) })
			var sat, ndr []string
			for _, p := range pts {
				sat = append(sat, fmt.Sprintf("%.1f,%.1f", xOf(p.sas), yOf(p.sat)))
				if p.ndr > 0 {
					ndr = append(ndr, fmt.Sprintf("%.1f,%.1f", xOf(p.sas), yOf(p.ndr)))
				}
			}
			fmt.Fprintf(w, `<polyline points="%s" fill="none" stroke="%s" stroke-width="2"/>`+"\n", strings.Join(sat, " "), colors[dir])
			if len(ndr) > 0 {
				fmt.Fprintf(w, `<polyline points="%s" fill="none" stroke="%s" stroke-width="2" stroke-dasharray="6,3"/>`+"\n", strings.Join(ndr, " "), colors[dir])
			}
		}
	}
	ly := y0 + plotH + 30
	for i, dir := range []string{"decap", "encap"} {
		fmt.Fprintf(w, `<rect x="%d" y="%d" width="10" height="10" fill="%s"/><text x="%d" y="%d" font-size="11">%s</text>`+"\n", left+i*100, ly, colors[dir], left+i*100+14, ly+9, dir)
	}
	return plotH + 80
}

func ppsLabel(v float64) string {
	switch {
	case v >= 1e6:
		return fmt.Sprintf("%gM", v/1e6)
	case v >= 1e3:
		return fmt.Sprintf("%gk", v/1e3)
	}
	return fmt.Sprintf("%g", v)
}

// gateMarkdown is the gate run's table: per scenario, the three systems'
// CPU time per packet (medians over the pairs), the gated ratios and, for
// reading beside them, the wall-clock ratios and the AEAD ratio.
func (r *Report) gateMarkdown(w io.Writer) {
	fmt.Fprintf(w, "Gate run %s on %s, %d cores, kernel %s, %s; %d interleaved pairs (reflect, xesp, sockets; order rotating) of one %d-frame ring each per scenario (%.0f s in all). ns/pkt is the CPU time the system's threads ran per delivered packet; ratios are medians of the per-pair ratios; gated: ÷ reflect and ÷ sockets (CPU).\n\n",
		r.Started.Format("2006-01-02 15:04 UTC"), r.Machine.CPU, r.Machine.Cores, r.Machine.Kernel, r.Machine.Go, r.Pairs, r.Ring, r.Seconds)
	fmt.Fprintln(w, "| Scenario | xesp ns/pkt | reflect ns/pkt | sockets ns/pkt | ÷ reflect (CPU, gated) | ÷ sockets (CPU, gated) | ÷ reflect (wall) | ÷ sockets (wall) | ÷ AEAD (wall) | xesp Mpps wall |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	for i, x := range r.Results {
		if x.Group != "xesp" || i+2 >= len(r.Results) {
			continue
		}
		c, b := r.Results[i+1], r.Results[i+2]
		fmt.Fprintf(w, "| %s | %.0f | %.0f | %.0f | %s | %s | %s | %s | %s | %s |\n", x.Name, x.CPUNs, c.CPUNs, b.CPUNs,
			ratio(x.Ratios, "afxdp_reflect"), ratio(x.Ratios, "vs_sockets"), ratio(x.Ratios, "afxdp_reflect_wall"), ratio(x.Ratios, "vs_sockets_wall"),
			ratio(x.Ratios, "aead"), mpps(x.PPS))
	}
	for _, s := range r.Warnings {
		fmt.Fprintf(w, "\n- %s", s)
	}
	fmt.Fprintln(w)
}

// linkOf is the gateway link a direction receives on.
func linkOf(dir string) string {
	if dir == "encap" {
		return "private"
	}
	return "public"
}
