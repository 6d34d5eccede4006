package sample

import (
	"net/http"
	"testing"
	"time"
)

func TestParseFailSpec(t *testing.T) {
	tests := []struct {
		in      string
		want    FailSpec
		wantErr bool
	}{
		{in: "", want: FailSpec{}},
		{in: "0", want: FailSpec{}},
		{in: "0.25", want: FailSpec{Fraction: 0.25}},
		{in: " 1 ", want: FailSpec{Fraction: 1}},
		{in: "1/4", want: FailSpec{K: 1, N: 4}},
		{in: "0/3", want: FailSpec{K: 0, N: 3}},
		{in: "3/3", want: FailSpec{K: 3, N: 3}},
		{in: " 2 / 5 ", want: FailSpec{K: 2, N: 5}},
		{in: "1.5", wantErr: true},
		{in: "-0.1", wantErr: true},
		{in: "NaN", wantErr: true},
		{in: "Inf", wantErr: true},
		{in: "4/3", wantErr: true},
		{in: "1/0", wantErr: true},
		{in: "-1/3", wantErr: true},
		{in: "1/2000000", wantErr: true},
		{in: "a/b", wantErr: true},
		{in: "1/2/3", wantErr: true},
		{in: "half", wantErr: true},
	}
	for _, tt := range tests {
		got, err := ParseFailSpec(tt.in)
		if (err != nil) != tt.wantErr {
			t.Errorf("ParseFailSpec(%q) error = %v, want error %v", tt.in, err, tt.wantErr)
			continue
		}
		if got != tt.want {
			t.Errorf("ParseFailSpec(%q) = %+v, want %+v", tt.in, got, tt.want)
		}
	}
}

func FuzzParseFailSpec(f *testing.F) {
	for _, s := range []string{"", "0.5", "1/4", "3/3", "1e-3", "0x1p-2", "9/1000000"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		spec, err := ParseFailSpec(s)
		if err != nil {
			return
		}
		if spec.N > 0 {
			if spec.K < 0 || spec.K > spec.N || spec.N > maxDenominator || spec.Fraction != 0 {
				t.Fatalf("ParseFailSpec(%q) = %+v: out of range", s, spec)
			}
		} else if !(spec.Fraction >= 0 && spec.Fraction <= 1) {
			t.Fatalf("ParseFailSpec(%q) = %+v: fraction out of range", s, spec)
		}
		again, err := ParseFailSpec(spec.String())
		if err != nil || again != spec {
			t.Fatalf("round trip of %q via %q = %+v, %v; want %+v", s, spec.String(), again, err, spec)
		}
	})
}

func TestFailerDeterministic(t *testing.T) {
	tests := []struct {
		spec string
		want string // f = fail, . = pass
	}{
		{"2/3", "ff.ff.ff."},
		{"1/4", "f...f...f"},
		{"0/2", "......"},
		{"3/3", "fff"},
	}
	for _, tt := range tests {
		spec, err := ParseFailSpec(tt.spec)
		if err != nil {
			t.Fatal(err)
		}
		f := newFailer(func() float64 { t.Fatal("deterministic spec drew a random number"); return 0 })
		got := make([]byte, len(tt.want))
		for i := range got {
			got[i] = '.'
			if f.fail(spec) {
				got[i] = 'f'
			}
		}
		if string(got) != tt.want {
			t.Errorf("%s: got %s, want %s", tt.spec, got, tt.want)
		}
	}
}

func TestFailerCountsPerSpec(t *testing.T) {
	f := newFailer(nil)
	a, b := FailSpec{K: 1, N: 2}, FailSpec{K: 1, N: 3}
	// Interleaving two specs must not disturb either sequence.
	got := ""
	for range 3 {
		for _, s := range []FailSpec{a, b} {
			if f.fail(s) {
				got += "f"
			} else {
				got += "."
			}
		}
	}
	if want := "ff..f."; got != want { // a: f.f  b: f..
		t.Errorf("got %s, want %s", got, want)
	}
}

func TestFailerFraction(t *testing.T) {
	draws := []float64{0.1, 0.5, 0.29, 0.3, 0.99}
	i := 0
	f := newFailer(func() float64 { v := draws[i]; i++; return v })
	got := ""
	for range draws {
		if f.fail(FailSpec{Fraction: 0.3}) {
			got += "f"
		} else {
			got += "."
		}
	}
	if want := "f.f.."; got != want {
		t.Errorf("got %s, want %s", got, want)
	}
	if f.fail(FailSpec{}) {
		t.Error("zero spec failed a request")
	}
}

func TestFailerBoundedCounters(t *testing.T) {
	f := newFailer(nil)
	for n := 1; n <= 3*maxCounters; n++ {
		f.fail(FailSpec{K: 1, N: n})
	}
	if len(f.counters) > maxCounters {
		t.Errorf("%d counters kept, want at most %d", len(f.counters), maxCounters)
	}
}

func TestFaultOverride(t *testing.T) {
	base := Fault{Fail: FailSpec{Fraction: 0.5}, Code: 500, Delay: time.Second}
	tests := []struct {
		name    string
		role    Role
		headers map[string]string
		want    Fault
		wantErr bool
	}{
		{name: "no knobs", role: RoleDetails, want: base},
		{name: "all knobs", role: RoleDetails,
			headers: map[string]string{HeaderFail: "1/2", HeaderFailCode: "429", HeaderDelay: "20ms"},
			want:    Fault{Fail: FailSpec{K: 1, N: 2}, Code: 429, Delay: 20 * time.Millisecond}},
		{name: "switch failures off", role: RoleDetails, headers: map[string]string{HeaderFail: "0"},
			want: Fault{Code: 500, Delay: time.Second}},
		{name: "grpc code", role: RoleRatings, headers: map[string]string{HeaderFailCode: "8"},
			want: Fault{Fail: base.Fail, Code: 8, Delay: time.Second}},
		{name: "http code for ratings", role: RoleRatings, headers: map[string]string{HeaderFailCode: "503"}, wantErr: true},
		{name: "grpc code for http", role: RoleDetails, headers: map[string]string{HeaderFailCode: "14"}, wantErr: true},
		{name: "bad code", role: RoleDetails, headers: map[string]string{HeaderFailCode: "x"}, wantErr: true},
		{name: "bad spec", role: RoleDetails, headers: map[string]string{HeaderFail: "2"}, wantErr: true},
		{name: "bad delay", role: RoleDetails, headers: map[string]string{HeaderDelay: "soon"}, wantErr: true},
		{name: "negative delay", role: RoleDetails, headers: map[string]string{HeaderDelay: "-1s"}, wantErr: true},
		{name: "delay too long", role: RoleDetails, headers: map[string]string{HeaderDelay: "2h"}, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := http.Header{}
			for k, v := range tt.headers {
				h.Set(k, v)
			}
			got, err := base.override(tt.role, h.Get)
			if (err != nil) != tt.wantErr {
				t.Fatalf("error = %v, want error %v", err, tt.wantErr)
			}
			if err == nil && got != tt.want {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}
