// Command amesh-chartgen regenerates the Helm chart's crds/ and templates/
// (manifests/charts/amesh) from the kustomize base. `make generate` runs it.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/amesh-dev/amesh/e2e/manifest"
)

func main() {
	start := flag.String("root", ".", "a directory inside the repository")
	flag.Parse()
	root, err := manifest.FindRoot(*start)
	if err == nil {
		err = manifest.WriteChart(root)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "amesh-chartgen:", err)
		os.Exit(1)
	}
}
