//go:build race

package dnscache

const raceEnabled = true
