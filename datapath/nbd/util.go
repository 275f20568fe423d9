package nbd

import "strconv"

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

func hexString(n uint32) string { return "0x" + strconv.FormatUint(uint64(n), 16) }
