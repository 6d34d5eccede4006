//go:build race

package hbone

// bulkSize is scaled down under the race detector, which slows the copy
// loops by an order of magnitude.
const bulkSize = 64 << 20
