//go:build !race

package hbone

const bulkSize = 1 << 30
