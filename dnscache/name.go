package dnscache

import "strings"

// canonical returns name in canonical form: ASCII lower case without the
// trailing dot. It reports false for names that are not valid host names
// (see the package doc). A name already in canonical form is returned as is,
// without allocating.
func canonical(name string) (string, bool) {
	if n := len(name); n > 0 && name[n-1] == '.' {
		name = name[:n-1]
	}
	if len(name) == 0 || len(name) > 253 {
		return "", false
	}
	upper := false
	label := 0
	for i := 0; i < len(name); i++ {
		switch ch := name[i]; {
		case ch >= 'a' && ch <= 'z', ch >= '0' && ch <= '9', ch == '-', ch == '_':
		case ch >= 'A' && ch <= 'Z':
			upper = true
		case ch == '.':
			if label == 0 {
				return "", false
			}
			label = 0
			continue
		default:
			return "", false
		}
		if label++; label > 63 {
			return "", false
		}
	}
	if label == 0 {
		return "", false
	}
	if upper {
		name = strings.ToLower(name)
	}
	return name, true
}

// invalidName is the error for a name that canonical rejects.
func invalidName(name, typ string) *Error {
	return &Error{Kind: KindInvalidName, Name: name, Type: typ}
}
